"""Every TLS context fetcher makes, for HTTP and for SMTP, and the start-up check of their files.

One context per TLS configuration, never per request or per host: HTTP jobs share the
``tls`` settings' context (aiohttp's own when those are the defaults), each SMTP profile one
of its own built from the same rules (system CAs, the run's extra ``tls.ca_bundle``, the
profile's ``ca_bundle``, TLS >= 1.2, ``--insecure``).
"""

from __future__ import annotations

import ssl

from .config import Settings, SmtpProfile, TlsSettings
from .errors import ConfigError

#  Printed once per run, by `fetcher run` and by `fetcher worker`, however verification was
#  turned off (--insecure, FETCHER_INSECURE, insecure or tls.verify in the config).
INSECURE_WARNING = "TLS certificate verification is OFF (--insecure): responses may be forged"


def _client_context(verify: bool, *bundles: object) -> ssl.SSLContext:
    """System CAs plus ``bundles`` (loaded here; OSError / SSLError for an unusable one)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for bundle in bundles:
        if bundle is not None:
            ctx.load_verify_locations(cafile=str(bundle))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The client TLS context of the ``tls`` settings; raises ConfigError for unusable files."""
    tls = settings.tls
    try:
        ctx = _client_context(tls.verify, tls.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        reason = _tls_reason(exc)
        raise ConfigError(f"tls.ca_bundle: cannot load {tls.ca_bundle}: {reason}") from None
    if tls.client_cert is not None:
        try:
            ctx.load_cert_chain(
                str(tls.client_cert), str(tls.client_key) if tls.client_key is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls.client_cert: cannot load {tls.client_cert}: {_tls_reason(exc)}"
            ) from None
    return ctx


def smtp_ssl_context(settings: Settings, profile: SmtpProfile) -> ssl.SSLContext:
    """TLS for one SMTP profile: system CAs, the run's and the profile's extra CAs, --insecure."""
    return _client_context(settings.tls.verify, settings.tls.ca_bundle, profile.ca_bundle)


def _tls_reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return "not a usable PEM certificate or key"
    return exc.strerror or str(exc)


def check_tls(settings: Settings) -> None:
    """Fail now, before any output is opened, when the TLS files of the config are unusable
    (the SMTP profiles' CA bundles too: mail connections load them only when first used)."""
    if settings.tls != TlsSettings():
        ssl_context(settings)
    for name, profile in settings.smtp.items():
        if profile.ca_bundle is not None:
            try:
                _client_context(True, profile.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                reason = _tls_reason(exc)
                raise ConfigError(
                    f"smtp.{name}.ca_bundle: cannot load {profile.ca_bundle}: {reason}"
                ) from None
