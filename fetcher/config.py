"""Settings: defaults < config file < ``FETCHER_*`` environment < command-line flags.

Every key is documented with its default in ``configs/default.yaml``. Settings are frozen once
loaded; secrets never sit in them (SMTP passwords are named by environment variable, proxy
credentials come from ``${ENV}`` expansion and are hidden from ``repr``).
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from ._version import __version__
from .errors import ConfigError
from .shard import parse_shard

ENV_PREFIX = "FETCHER_"
_T = TypeVar("_T", str, dict[str, str])

_frozen = ConfigDict(frozen=True, extra="forbid")


class TlsSettings(BaseModel):
    model_config = _frozen
    verify: bool = True
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


class NetworkSettings(BaseModel):
    model_config = _frozen
    block_private: bool = False
    deny_networks: tuple[str, ...] = ()
    allow_networks: tuple[str, ...] = ()

    @field_validator("deny_networks", "allow_networks")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # Checked here so that a typo stops the run at start-up (exit 2), not at the first job.
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a CIDR network") from None
        return v


class SmtpProfile(BaseModel):
    model_config = _frozen
    host: str = "localhost"
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password_env: str | None = None
    timeout: float = Field(default=30, gt=0)
    pool_size: int = Field(default=4, ge=1)
    max_messages_per_connection: int = Field(default=100, ge=1)
    rate: float | None = Field(default=None, gt=0)
    ca_bundle: Path | None = None
    idle_timeout: float = Field(default=30, gt=0)


def _default_smtp() -> dict[str, SmtpProfile]:
    return {"default": SmtpProfile()}


class SaveSettings(BaseModel):
    model_config = _frozen
    dir: Path | None = None
    name: str = "{sha256:0:2}/{sha256}"
    #  Also keep the bodies of responses with status >= 400.
    errors: bool = False

    @field_validator("name")
    @classmethod
    def _template(cls, v: str) -> str:
        from .save import NameTemplate  # checked at start-up: a typo stops the run (exit 2)

        NameTemplate(v)
        return v


class WarcSettings(BaseModel):
    model_config = _frozen
    file: Path | None = None
    max_size: int = Field(default=1 << 30, ge=1 << 20)


class Settings(BaseModel):
    """Everything a run can be told. Keys match the config file and ``FETCHER_<KEY>``.

    Keys not given to the constructor come from ``FETCHER_<KEY>`` environment variables, then
    from the config file that ``load_settings`` is reading, then from the defaults.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    concurrency: int = Field(default=100, ge=1, le=100_000)
    processes: int = Field(default=1, ge=1, le=256)
    per_host: int = Field(default=0, ge=0)
    #  The most idle keep-alive connections kept over all hosts (connector.py, fdlimit.py).
    max_idle_connections: int | None = Field(default=None, ge=0)
    #  Where the idle pool starts (null = the concurrency); it adapts between the two.
    min_idle_connections: int | None = Field(default=None, ge=0)
    rate: float | None = Field(default=None, gt=0)
    # Off by default: -n and --per-host then mean exactly what they say (README, "Adaptive").
    adaptive: bool = False
    timeout: float = Field(default=30, gt=0)
    retries: int = Field(default=2, ge=0, le=100)
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    max_redirects: int = Field(default=10, ge=0)
    backoff_base: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30, ge=0)
    retry_after_max: float = Field(default=60, ge=0)
    shutdown_grace: float = Field(default=10, ge=0)
    fsync_interval: float | None = Field(default=None, gt=0)
    progress_interval: float = Field(default=5, gt=0)
    user_agent: str = f"fetcher/{__version__}"
    headers: dict[str, str] = Field(default_factory=dict)
    resolve: dict[str, str] = Field(default_factory=dict)
    tls: TlsSettings = TlsSettings()
    network: NetworkSettings = NetworkSettings()
    save: SaveSettings = SaveSettings()
    warc: WarcSettings = WarcSettings()
    proxy: str | None = Field(default=None, repr=False)
    trust_env: bool = False
    trace: bool = False  # --trace: timings, redirect_chain and tls in http results
    robots: bool = False  # --robots: obey robots.txt and its Crawl-delay
    smtp: dict[str, SmtpProfile] = Field(default_factory=_default_smtp)
    # The other options of `fetcher run` (the Python API ignores these; `fetcher worker` reads
    # only insecure and the metrics keys), so that each can be set here and by FETCHER_<NAME>.
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal
    #  tls.verify false by another name: the validator below folds it into tls.
    insecure: bool = False
    shard: str | None = None  # "K/N", or "N" with K from $JOB_COMPLETION_INDEX
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #  How job files are read (inputs.py): the format when the name does not tell it, the
    #  CSV / TSV column of the URLs, and fields merged under every job of every format.
    input_format: Literal["jsonl", "yaml", "urls", "csv", "tsv"] | None = None
    url_column: str = Field(default="url", min_length=1)
    job_defaults: dict[str, Any] = Field(default_factory=dict)
    #  Output shaping and reruns (shaping.py, resume.py, revalidate.py).
    fields: tuple[str, ...] | None = None  # --fields: "id,status" or a list
    format: Literal["jsonl", "csv"] | None = None  # None: csv for an OUT ending .csv
    retry_failed: str | None = None  # --retry-failed PREV
    since: str | None = None  # --since PREV

    @field_validator("fields", mode="before")
    @classmethod
    def _known_fields(cls, v: Any) -> Any:
        if v is None or v == "":
            return None
        from .shaping import parse_fields

        if not isinstance(v, str | list | tuple):
            return v  # the type check reports it
        return parse_fields(v)

    @model_validator(mode="before")
    @classmethod
    def _insecure_turns_verify_off(cls, data: Any) -> Any:
        # Everything that verifies certificates then has one key to look at, tls.verify.
        if not isinstance(data, dict) or not _is_true(data.get("insecure")):
            return data
        tls = data.get("tls")
        if isinstance(tls, TlsSettings):
            tls = tls.model_copy(update={"verify": False})
        elif tls is None or isinstance(tls, dict):
            tls = {**(tls or {}), "verify": False}
        return {**data, "tls": tls}

    @field_validator("shard", mode="before")
    @classmethod
    def _shard_spec(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # `shard: 4` in YAML: N alone
        if isinstance(v, str):
            parse_shard(v)
        return v

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port_is_off(cls, v: Any) -> Any:
        # FETCHER_METRICS_PORT= (set but empty) has always meant "no metrics".
        return None if v == "" else v

    @field_validator("resolve")
    @classmethod
    def _addresses(cls, v: dict[str, str]) -> dict[str, str]:
        for name, address in v.items():
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"{name}: {address!r} is not an IP address") from None
        return v

    @field_validator("headers", "user_agent")
    @classmethod
    def _no_control_characters(cls, v: _T) -> _T:
        values = v.items() if isinstance(v, dict) else [("", v)]
        for name, value in values:
            if any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in f"{name}{value}"):
                raise ValueError("must not contain control characters (CR, LF, NUL...)")
        return v

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from yarl import URL

        try:
            url = URL(v)
        except ValueError:
            url = None
        schemes = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")
        if url is None or url.scheme.lower() not in schemes or not url.host:
            # The value may hold credentials: the message does not repeat it.
            raise ValueError("must be an http(s)://, socks5://, socks5h:// or socks4:// URL")
        return v

    @field_validator("smtp")
    @classmethod
    def _keep_default_profile(cls, v: dict[str, SmtpProfile]) -> dict[str, SmtpProfile]:
        # A config that defines only `bulk` still has `default` for jobs that name none.
        return v if "default" in v else {"default": SmtpProfile(), **v}

    def __init__(self, **keys: Any) -> None:
        # Keyword arguments (the flags) win over the environment, which wins over the file.
        super().__init__(**_deep_update(_file_data.get() or {}, _environment(), keys))


def _environment() -> dict[str, Any]:
    """The settings given as ``FETCHER_*`` environment variables, parsed by pydantic-settings
    (nested keys as ``FETCHER_TLS__VERIFY``, lists and mappings as JSON).

    pydantic-settings is imported only when such a variable is set: a run without one has no
    use for the 10 ms and 1.5 MB that importing it costs.
    """
    if not any(name[: len(ENV_PREFIX)].upper() == ENV_PREFIX for name in os.environ):
        return {}
    from pydantic_settings import EnvSettingsSource, SettingsError

    source = EnvSettingsSource(
        Settings,  # type: ignore[arg-type]  # reads only model_fields and model_config
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )
    try:
        return source()
    except SettingsError as exc:  # a list or mapping that is not JSON
        m = re.search(r'field "(\w+)"', str(exc))  # the message names the field, not the variable
        where = f"{ENV_PREFIX}{m.group(1).upper()}: {m.group(1)}" if m else f"{ENV_PREFIX}*"
        raise ConfigError(f"config error in environment {where}: not valid JSON") from None


def _deep_update(base: dict[str, Any], *updates: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by each of ``updates`` in turn, mappings merged key by key (a file's
    ``tls: {ca_bundle: ...}`` and ``FETCHER_TLS__VERIFY`` both hold)."""
    merged = dict(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = _deep_update(merged[key], value)
            else:
                merged[key] = value
    return merged


_BOOL = TypeAdapter(bool)


def _is_true(value: Any) -> bool:
    """Whether a raw value (a flag's True, a file's true, an environment's "1") reads as true;
    a value that is not a boolean at all is left for the field's own check to report."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False


# The config file's contents reach Settings.__init__ through this, to sit under the environment.
_file_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "_file_data", default=None
)

_ENV_REF = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """Replace ``${NAME}`` with the variable's value; ``$${NAME}`` stays literal ``${NAME}``.

    Raises KeyError naming the first missing variable.
    """

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "${" + m.group(2) + "}"
        return environ[m.group(2)]

    return _ENV_REF.sub(sub, value)


def _expand_tree(node: Any, where: str) -> Any:
    if isinstance(node, str):
        if "${" not in node:
            return node
        try:
            return expand_env(node)
        except KeyError as exc:
            raise ConfigError(f"{where}: environment variable {exc.args[0]} is not set") from None
    if isinstance(node, dict):
        return {k: _expand_tree(v, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, where) for v in node]
    return node


def read_config_file(path: str | Path) -> dict[str, Any]:
    from . import yamlload  # PyYAML is imported only by runs given a config file

    try:
        with open(path, "rb") as f:
            data = yamlload.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yamlload.YAMLError as exc:
        at, problem = yamlload.describe(exc)
        raise ConfigError(f"config file {path}{at}: {problem or 'not valid YAML'}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of keys, got {type(data).__name__}"
        )
    # job_defaults keep their ${NAME} references: they are expanded job by job, as a job
    # file's are, so that `fetcher enqueue` never stores a secret in Redis.
    expanded: dict[str, Any] = {
        key: value if key == "job_defaults" else _expand_tree(value, f"{path}.{key}")
        for key, value in data.items()
    }
    return expanded


def load_settings(
    config_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build Settings from the config file, the environment and flag overrides.

    Raises ConfigError with one line naming the key and where its bad value came from.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_data = read_config_file(config_path) if config_path else {}
    token = _file_data.set(file_data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, overrides, config_path)) from None
    finally:
        _file_data.reset(token)


def _describe(exc: ValidationError, flags: dict[str, Any], config_path: str | Path | None) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    top = str(err["loc"][0]) if err["loc"] else ""
    if top in flags:
        where = f"--{top.replace('_', '-')}"
    elif any(k.upper().startswith(ENV_PREFIX + top.upper()) for k in os.environ):
        where = f"environment {ENV_PREFIX}{top.upper()}"
    elif config_path:
        where = f"config file {config_path}"
    else:
        where = "settings"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"config error in {where}: {loc}: {msg}"
