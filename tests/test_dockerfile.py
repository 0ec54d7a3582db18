"""The Dockerfile, checked without a container engine: its final stage's instructions, and the
entrypoint command run the way the image runs it. scripts/container-smoke.sh builds and runs the
image for real."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            name, _, args = line.strip().partition(" ")
            result.append((name.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions per build stage; stage 0 holds what comes before the first FROM."""
    out: list[list[tuple[str, str]]] = [[]]
    for name, args in instructions(text):
        if name == "FROM":
            out.append([])
        out[-1].append((name, args))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    assert all(isinstance(a, str) for a in value)
    return value


class _HealthServer:
    """A /healthz endpoint on loopback answering a fixed status."""

    def __init__(self, status: int) -> None:
        code = status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(code if self.path == "/healthz" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        return int(self.server.server_address[1])

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def dockerfile() -> list[list[tuple[str, str]]]:
    return stages(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(dockerfile: list[list[tuple[str, str]]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, args in dockerfile[-1]:
        found.setdefault(name, []).append(args)
    return found


def last(final: dict[str, list[str]], name: str) -> str:
    assert name in final, f"final stage has no {name}"
    return final[name][-1]


def test_base_is_a_build_argument_defaulting_to_official_slim(dockerfile) -> None:
    preamble = dockerfile[0]
    assert ("ARG", "BASE=python:3.12-slim") in preamble
    froms = [args for stage in dockerfile[1:] for name, args in stage if name == "FROM"]
    assert froms, "no FROM"
    assert all(f.split()[0] == "${BASE}" for f in froms), froms


def test_multi_stage_final_stage_copies_from_the_build_stage(dockerfile, final) -> None:
    assert len(dockerfile) - 1 >= 2, "expected a build stage and a final stage"
    assert any(a.startswith("--from=") for a in final.get("COPY", [])), final.get("COPY")
    # The final stage builds nothing itself: no pip wheel / pip install, no compilers.
    for run in final.get("RUN", []):
        assert "pip" not in run and "gcc" not in run and "apt-get install" not in run, run
    # Sources and tests reach the build stage only.
    assert not any(
        "tests" in a or a.split()[0] == "." for a in final.get("COPY", []) + final.get("ADD", [])
    )


def test_entrypoint_and_cmd(final) -> None:
    assert exec_form(last(final, "ENTRYPOINT")) == ["fetcher"]
    assert exec_form(last(final, "CMD")) == ["--help"]


def test_runs_as_a_numeric_non_root_user(final) -> None:
    user = last(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user


def test_stop_signal_and_workdir(final) -> None:
    assert last(final, "STOPSIGNAL") == "SIGTERM"
    assert last(final, "WORKDIR") == "/data"


def test_healthcheck_probes_healthz_only_when_a_metrics_port_is_set(final) -> None:
    hc = last(final, "HEALTHCHECK")
    _, _, command = hc.partition("CMD ")
    assert command, hc
    argv = exec_form(command.strip())
    assert argv[:2] == ["python3", "-c"]
    code = argv[2]
    assert "FETCHER_METRICS_PORT" in code and "/healthz" in code
    # Batch mode (no metrics port): the probe is a no-op that succeeds.
    env = {k: v for k, v in os.environ.items() if k != "FETCHER_METRICS_PORT"}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=30)
    assert done.returncode == 0
    # Worker mode: 2xx from /healthz passes, anything else fails.
    with _HealthServer(200) as port:
        done = subprocess.run(
            [sys.executable, "-c", code], env={**env, "FETCHER_METRICS_PORT": str(port)}, timeout=30
        )
        assert done.returncode == 0
    with _HealthServer(503) as port:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "FETCHER_METRICS_PORT": str(port)},
            capture_output=True,
            timeout=30,
        )
        assert done.returncode != 0
    # Nothing listening on the port: fails.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "FETCHER_METRICS_PORT": str(port)},
        capture_output=True,
        timeout=30,
    )
    assert done.returncode != 0


def test_dockerignore_keeps_secrets_and_tests_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", "tests", "**/__pycache__"):
        assert required in patterns, required


def test_entrypoint_command_runs(final) -> None:
    """`docker run IMAGE` runs ENTRYPOINT + CMD: `fetcher --help`, found on PATH."""
    argv = exec_form(last(final, "ENTRYPOINT")) + exec_form(last(final, "CMD"))
    exe = shutil.which(
        argv[0],
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    assert exe, f"{argv[0]} is not installed next to {sys.executable}"
    done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fetcher"), shlex.join(argv)
    for command in ("run", "validate"):
        assert command in done.stdout
