"""Settings: precedence flag > FETCHER_* environment > config file > default, and clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from fetcher.config import Settings, SmtpProfile, load_settings
from fetcher.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FETCHER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults_match_the_spec() -> None:
    s = load_settings()
    assert s.concurrency == 100
    assert s.per_host == 0
    assert s.rate is None
    assert s.timeout == 30
    assert s.retries == 2
    assert s.max_bytes == 10 * 1024 * 1024
    assert s.shutdown_grace == 10
    assert s.user_agent.startswith("fetcher/")
    assert s.headers == {}
    assert s.tls.verify is True
    assert s.network.block_private is False
    assert s.proxy is None and s.trust_env is False
    assert set(s.smtp) == {"default"} and s.smtp["default"].port == 587


def yaml_leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of a YAML mapping's keys, down to the values that are not mappings."""
    leaves: set[str] = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        leaves |= yaml_leaves(value, path + ".") if isinstance(value, dict) and value else {path}
    return leaves


def settings_leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every settings key; SMTP profiles as the one named ``default``."""
    leaves: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            leaves |= settings_leaves(kind, path + ".")
        elif name == "smtp" and model is Settings:
            leaves |= settings_leaves(SmtpProfile, path + ".default.")
        else:
            leaves.add(path)
    return leaves


def test_default_yaml_documents_exactly_the_defaults() -> None:
    path = REPO / "configs" / "default.yaml"
    text = path.read_text()
    assert yaml_leaves(yaml.safe_load(text)) == settings_leaves(Settings)
    assert load_settings(path) == load_settings()
    # Every key, nested ones and section headings too, carries a comment on its line.
    key_line = re.compile(r"^\s*([A-Za-z_]\w*):")
    uncommented = [line for line in text.splitlines() if key_line.match(line) and " # " not in line]
    assert uncommented == [], "keys without a one-line comment in configs/default.yaml"


def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path, "timeout: 11\nretries: 5\nconcurrency: 7\nper_host: 3\n")
    monkeypatch.setenv("FETCHER_TIMEOUT", "12")
    monkeypatch.setenv("FETCHER_RETRIES", "6")
    s = load_settings(cfg, {"timeout": 13, "concurrency": None})
    assert s.timeout == 13  # flag beats env and file
    assert s.retries == 6  # env beats file
    assert s.concurrency == 7  # an unset flag (None) does not hide the file
    assert s.per_host == 3  # file beats default
    assert s.max_bytes == 10 * 1024 * 1024  # default


def test_env_names_are_case_insensitive_and_nested_with_double_underscore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("fetcher_max_bytes", "1234")
    monkeypatch.setenv("FETCHER_TLS__VERIFY", "false")
    s = load_settings()
    assert s.max_bytes == 1234
    assert s.tls.verify is False


def test_nested_keys_merge_across_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "tls:\n  ca_bundle: /etc/extra.pem\n")
    s = load_settings(cfg, {"tls": {"verify": False}})  # what --insecure passes
    assert s.tls.verify is False
    assert s.tls.ca_bundle == Path("/etc/extra.pem")


def test_env_references_in_the_config_file_are_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXY_PASSWORD", "pw")
    cfg = write(tmp_path, 'proxy: "http://u:${PROXY_PASSWORD}@127.0.0.1:3128"\n')
    s = load_settings(cfg)
    assert s.proxy == "http://u:pw@127.0.0.1:3128"
    assert "pw@" not in repr(s)  # the proxy (and its credentials) stay out of repr


def test_missing_env_reference_in_config_is_one_line_error(tmp_path: Path) -> None:
    cfg = write(tmp_path, "headers:\n  Authorization: Bearer ${FETCHER_TEST_UNSET_TOKEN}\n")
    msg = config_error(cfg)
    assert "FETCHER_TEST_UNSET_TOKEN" in msg and "not set" in msg
    assert "headers.Authorization" in msg


def test_empty_config_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == load_settings()


def test_unknown_key_is_named(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "timeout: 3\nconcurency: 5\n"))
    assert "concurency" in msg and "unknown key" in msg and "config.yaml" in msg


def test_bad_value_in_file_names_key_and_file(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "tls:\n  verify: maybe\n"))
    assert "tls.verify" in msg and "config.yaml" in msg


def test_bad_flag_value_names_the_flag() -> None:
    msg = config_error(None, {"max_bytes": -1})
    assert "--max-bytes" in msg


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FETCHER_CONCURRENCY", "lots")
    msg = config_error()
    assert "FETCHER_CONCURRENCY" in msg and "concurrency" in msg


@pytest.mark.parametrize("name", ["FETCHER_HEADERS", "FETCHER_NETWORK", "fetcher_resolve"])
def test_env_mapping_that_is_not_json_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "{not json")
    msg = config_error()
    assert f"environment {name.upper()}: " in msg and "not valid JSON" in msg


def test_settings_read_the_environment_under_their_keyword_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FETCHER_RETRIES", "7")
    monkeypatch.setenv("FETCHER_TIMEOUT", "3")
    s = Settings(timeout=9)  # the Python API, as load_settings: keywords > environment
    assert (s.retries, s.timeout) == (7, 9)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("timeout: [1,\n", "line"),  # YAML syntax error: where it is
        ("- 1\n- 2\n", "expected a mapping"),
        ("just a string\n", "expected a mapping"),
    ],
)
def test_unreadable_config_is_one_line_error(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(write(tmp_path, text))


def test_missing_config_file(tmp_path: Path) -> None:
    msg = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "No such file" in msg


def test_smtp_default_profile_is_kept_beside_others(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "smtp:\n  bulk:\n    host: mail.test\n    port: 2525\n"))
    assert set(s.smtp) == {"default", "bulk"}
    assert s.smtp["bulk"].port == 2525


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError):
        s.timeout = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"proxy": "not a url"}, "proxy"),
        ({"proxy": "ftp://127.0.0.1:21"}, "proxy"),
        ({"resolve": {"api.test": "not-an-ip"}}, "resolve"),
        ({"headers": {"X-Team": "a\r\nInjected: 1"}}, "headers"),
        ({"user_agent": "fetcher\n"}, "user_agent"),
    ],
)
def test_unusable_values_are_config_errors(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides)
    message = str(info.value)
    assert key in message and "\n" not in message
    assert "Value error" not in message


def test_proxy_credentials_are_not_repeated_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"proxy": "ftp://user:hunter2@proxy.test:21"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("resume", "true", True),
        ("overwrite", "true", True),
        ("progress", "false", False),
        ("progress", "true", True),
        ("insecure", "true", True),
        ("shard", "1/4", "1/4"),
        ("shard", "4", "4"),
        ("processes", "3", 3),
        ("metrics_port", "9109", 9109),
        ("metrics_host", "0.0.0.0", "0.0.0.0"),
    ],
)
def test_every_run_option_is_a_config_key_and_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, text: str, value: object
) -> None:
    assert getattr(load_settings(write(tmp_path, f"{key}: {text}\n")), key) == value
    monkeypatch.setenv(f"FETCHER_{key.upper()}", text)
    assert getattr(load_settings(), key) == value


def test_run_options_default_to_off_and_auto() -> None:
    s = load_settings()
    assert (s.resume, s.overwrite, s.progress, s.insecure) == (False, False, None, False)
    assert (s.shard, s.metrics_port, s.metrics_host) == (None, None, "127.0.0.1")


def test_run_option_precedence_flag_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path, "resume: true\nprogress: false\noverwrite: true\n")
    monkeypatch.setenv("FETCHER_RESUME", "false")
    monkeypatch.setenv("FETCHER_OVERWRITE", "false")
    s = load_settings(cfg, {"overwrite": True, "progress": None})
    assert s.resume is False  # env beats file
    assert s.overwrite is True  # flag beats env
    assert s.progress is False  # an absent flag (None) leaves the file's value


@pytest.mark.parametrize("source", ["file", "env", "flag"])
def test_insecure_is_tls_verify_false_and_keeps_the_other_tls_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    text = "tls:\n  verify: true\n  ca_bundle: /etc/extra.pem\n"
    overrides: dict[str, Any] = {}
    if source == "file":
        text += "insecure: true\n"
    elif source == "env":
        monkeypatch.setenv("FETCHER_INSECURE", "1")
    else:
        overrides["insecure"] = True
    s = load_settings(write(tmp_path, text), overrides)
    assert s.insecure is True and s.tls.verify is False
    assert s.tls.ca_bundle == Path("/etc/extra.pem")


def test_insecure_false_leaves_verification_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FETCHER_INSECURE", "false")
    assert load_settings().tls.verify is True
    assert Settings(insecure=True).tls.verify is False  # the Python API too


@pytest.mark.parametrize("text", ["4/4", "x/2", "1/0", "-1/3"])
def test_bad_shard_is_a_config_error(tmp_path: Path, text: str) -> None:
    msg = config_error(write(tmp_path, f'shard: "{text}"\n'))
    assert "shard" in msg and "config.yaml" in msg


def test_empty_metrics_port_variable_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FETCHER_METRICS_PORT", "")
    assert load_settings().metrics_port is None
