#!/usr/bin/env bash
# Container smoke test: build the image from this repository's Dockerfile the way `docker build .`
# does (only the BASE build argument differs), then run fetcher inside it against an HTTP server
# (and, when mail support is present, an SMTP sink) on the host's loopback.
#
# No Docker engine is needed: podman builds the image and buildah runs it, both with chroot
# isolation and vfs storage (see the README's container section). Run as root.
#
# Environment:
#   FETCHER_SMOKE_BASE   base image (default localhost/debian-python:bookworm, made with
#                        debootstrap on first use and kept for later runs)
#   FETCHER_SMOKE_KEEP   1 keeps the built image (tagged localhost/fetcher:smoke) afterwards
#   DEBIAN_MIRROR        Debian mirror for debootstrap (default: the host's apt source)
set -euo pipefail

cd "$(dirname "$0")/.."

BASE=${FETCHER_SMOKE_BASE:-localhost/debian-python:bookworm}
KEEP=${FETCHER_SMOKE_KEEP:-0}
STORE=(--storage-driver vfs)
IMAGE=localhost/fetcher:smoke-$$
[ "$KEEP" = 1 ] && IMAGE=localhost/fetcher:smoke

step() { printf '\n== %s\n' "$*" >&2; }
fail() {
  printf 'container-smoke: FAIL: %s\n' "$*" >&2
  exit 1
}

for tool in podman buildah python3; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install -y podman buildah debootstrap)"
done
[ "$(id -u)" = 0 ] || fail "run as root (podman/buildah with vfs storage and chroot isolation)"

# ---- cleanup of everything this script creates -----------------------------------------------
work=$(mktemp -d /tmp/fetcher-smoke.XXXXXX)
containers=()
pids=()
image_built=0
cleanup() {
  local rc=$?
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  for c in "${containers[@]}"; do buildah "${STORE[@]}" rm "$c" >/dev/null 2>&1; done
  if [ "$image_built" = 1 ] && [ "$KEEP" != 1 ]; then
    podman "${STORE[@]}" rmi -f "$IMAGE" >/dev/null 2>&1
  fi
  rm -rf "$work"
  if [ "$rc" -eq 0 ]; then
    printf '\ncontainer-smoke: PASS\n' >&2
  else
    printf '\ncontainer-smoke: FAILED (exit %s)\n' "$rc" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the local base image (cached in the vfs store between runs) -----------------------------
make_base() {
  command -v debootstrap >/dev/null || fail "debootstrap is not installed"
  local mirror=${DEBIAN_MIRROR:-}
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
  fi
  mirror=${mirror:-http://deb.debian.org/debian}
  local rootfs=$work/rootfs
  step "creating base image $BASE with debootstrap from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
  # Drop apt's package cache and lists from the image.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman "${STORE[@]}" import --quiet - "$BASE" >/dev/null \
    || fail "podman import of the base image failed"
  rm -rf "$rootfs"
}

if podman "${STORE[@]}" image exists "$BASE"; then
  step "base image $BASE: cached"
elif [ "$BASE" = localhost/debian-python:bookworm ]; then
  # Serialise concurrent first runs on one machine.
  exec 9>/var/tmp/fetcher-smoke-base.lock
  flock 9
  podman "${STORE[@]}" image exists "$BASE" || make_base
  flock -u 9
else
  fail "base image $BASE is not in the local store"
fi

# ---- build, exactly as `docker build .` but for BASE -----------------------------------------
# pip inside the build uses this machine's package index settings: mount the pip config files that
# exist, the CA bundle, and every local path they name (find-links dirs, file:// indexes).
mounts=()
declare -A mounted=()
add_mount() {
  local src=$1 dst=${2:-$1}
  [ -e "$src" ] || return 0
  [ -n "${mounted[$dst]:-}" ] && return 0
  mounted[$dst]=1
  mounts+=(-v "$src:$dst:ro")
}
add_mount /etc/ssl/certs/ca-certificates.crt
add_mount /etc/pip.conf
add_mount /root/.config/pip/pip.conf /etc/xdg/pip/pip.conf
# Every value in those files that is an existing absolute path, or a file:// URL of one.
while read -r path; do
  case $path in
    # A "simple" index links to its files relative to its parent (../../files/...).
    */simple) add_mount "$(dirname "$path")" ;;
    *) add_mount "$path" ;;
  esac
done < <(python3 - /etc/pip.conf /root/.config/pip/pip.conf <<'EOF'
import configparser, os, sys

for conf in sys.argv[1:]:
    parser = configparser.RawConfigParser()
    try:
        parser.read(conf)
    except configparser.Error:
        continue
    for section in parser.sections():
        for value in parser[section].values():
            for word in value.split():
                path = word.removeprefix("file://").rstrip("/")
                if path.startswith("/") and os.path.exists(path):
                    print(path)
EOF
)

step "building $IMAGE from Dockerfile (BASE=$BASE)"
build_start=$SECONDS
podman "${STORE[@]}" build --isolation chroot --network host --format docker --layers=false \
  --build-arg "BASE=$BASE" "${mounts[@]}" -t "$IMAGE" -f Dockerfile . >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; fail "image build failed (log above)"; }
image_built=1
echo "built in $((SECONDS - build_start)) s" >&2

inspect() { podman "${STORE[@]}" image inspect --format "$1" "$IMAGE"; }
size=$(inspect '{{.Size}}')
echo "image size: $size bytes ($((size / 1024 / 1024)) MiB)" >&2

# ---- the image's own config ------------------------------------------------------------------
step "image config"
entrypoint=$(inspect '{{json .Config.Entrypoint}}')
user=$(inspect '{{.Config.User}}')
stopsignal=$(inspect '{{.Config.StopSignal}}')
workdir=$(inspect '{{.Config.WorkingDir}}')
echo "entrypoint=$entrypoint user=$user stopsignal=$stopsignal workdir=$workdir" >&2
[ "$entrypoint" = '["fetcher"]' ] || fail "ENTRYPOINT is $entrypoint, expected [\"fetcher\"]"
case ${user%%:*} in '' | 0 | root) fail "image USER is '$user': must be a non-root user" ;; esac
[ "$stopsignal" = SIGTERM ] || fail "STOPSIGNAL is '$stopsignal', expected SIGTERM"
[ "$workdir" = /data ] || fail "WORKDIR is '$workdir', expected /data"

# ---- test fixtures on the host ---------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {
  local port=$1 _
  for _ in $(seq 50); do
    python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' \
      "$port" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

www=$work/www
data=$work/data
mkdir -p "$www" "$data"
printf 'hello from the smoke test\n' >"$www/hello.txt"
printf '{"answer": 42}\n' >"$www/data.json"
printf 'ok\n' >"$www/healthz"
# The container user writes its results here.
chmod 1777 "$data"

http_port=$(free_port)
python3 -m http.server --bind 127.0.0.1 --directory "$www" "$http_port" >"$work/http.log" 2>&1 &
pids+=($!)
wait_port "$http_port" || fail "local HTTP server did not start"

base_url=http://127.0.0.1:$http_port
cat >"$data/jobs.jsonl" <<EOF
{"id": "hello", "url": "$base_url/hello.txt", "body": "text"}
{"id": "json", "url": "$base_url/data.json", "body": "json"}
{"id": "missing", "url": "$base_url/missing.txt", "retries": 0}
EOF
printf 'concurrency: 4\ntimeout: 10\n' >"$data/config.yaml"

# ---- mail ------------------------------------------------------------------------------------
# Mail jobs run against a local SMTP sink once mail support (fetcher/mail.py) is in the tree.
mail=0
if [ -f fetcher/mail.py ]; then
  mail=1
  smtpd_python=python3
  [ -x .venv/bin/python ] && smtpd_python=.venv/bin/python
  "$smtpd_python" -c 'import aiosmtpd' 2>/dev/null \
    || fail "aiosmtpd is not importable by $smtpd_python (pip install -e '.[test]')"
  smtp_port=$(free_port)
  "$smtpd_python" -m aiosmtpd -n -l "127.0.0.1:$smtp_port" >"$work/smtp.log" 2>&1 &
  pids+=($!)
  wait_port "$smtp_port" || fail "local SMTP sink did not start"
  cat >>"$data/config.yaml" <<EOF
smtp:
  default:
    host: 127.0.0.1
    port: $smtp_port
    security: none
EOF
  cat >>"$data/jobs.jsonl" <<EOF
{"id": "mail", "kind": "mail", "from": "smoke@example.com", "to": ["user@example.com"], "subject": "container smoke $$", "text": "Hello from the container."}
EOF
else
  echo "mail: fetcher/mail.py not present; mail job skipped" >&2
fi

# ---- run inside the image --------------------------------------------------------------------
c=$(buildah "${STORE[@]}" from "$IMAGE")
containers+=("$c")
in_image() {
  buildah "${STORE[@]}" run --isolation chroot --network host -v "$data:/data" "$@"
}

step "fetcher --help"
in_image "$c" -- fetcher --help >"$work/help.txt" 2>&1 || {
  cat "$work/help.txt" >&2
  fail "fetcher --help failed in the image"
}
grep -q 'usage: fetcher' "$work/help.txt" || fail "fetcher --help printed no usage"

# `buildah run` ignores ENTRYPOINT and CMD: run them as `docker run IMAGE` would.
step "ENTRYPOINT + CMD, as \`docker run IMAGE\` runs them"
mapfile -t default_cmd < <(inspect '{{json .Config.Entrypoint}}{{"\n"}}{{json .Config.Cmd}}' \
  | python3 -c 'import json, sys; [print(a) for line in sys.stdin for a in (json.loads(line) or [])]')
echo "${default_cmd[*]}" >&2
[ "${#default_cmd[@]}" -gt 0 ] || fail "the image has neither ENTRYPOINT nor CMD"
in_image "$c" -- "${default_cmd[@]}" >"$work/default.txt" 2>&1 || {
  cat "$work/default.txt" >&2
  fail "the image's default command (${default_cmd[*]}) failed"
}
grep -q 'usage: fetcher' "$work/default.txt" || fail "the image's default command printed no usage"

step "user and contents"
uid=$(in_image "$c" -- id -u)
echo "uid inside the container: $uid" >&2
[ "$uid" != 0 ] || fail "the process inside the container runs as root"
# shellcheck disable=SC2016  # expanded by the shell inside the image
in_image "$c" -- sh -c '
  bad=0
  for tool in gcc cc c++ make; do
    if command -v "$tool" >/dev/null; then echo "compiler in the image: $tool"; bad=1; fi
  done
  for path in /wheels /src /root/.cache/pip /opt/fetcher/bin/pip; do
    if [ -e "$path" ]; then echo "left in the image: $path"; bad=1; fi
  done
  exit "$bad"
' || fail "the final image holds build leftovers"
in_image "$c" -- python3 -c '
import importlib.util, sys
for name in ("tests", "pytest"):
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"{name} is importable in the image")
' || fail "the test suite or test tools are in the image"

step "fetcher validate"
in_image "$c" -- fetcher validate -c /data/config.yaml /data/jobs.jsonl >"$work/validate.txt" 2>&1 || {
  cat "$work/validate.txt" >&2
  fail "fetcher validate rejected the job file"
}
printf '{"url": "not a url"}\n' >"$data/bad.jsonl"
set +e
in_image "$c" -- fetcher validate /data/bad.jsonl >"$work/validate-bad.txt" 2>&1
rc=$?
set -e
[ "$rc" = 2 ] || fail "fetcher validate of a bad job file exited $rc, expected 2"

step "fetcher run"
set +e
in_image "$c" -- fetcher run -c /data/config.yaml /data/jobs.jsonl -o /data/out.jsonl \
  >"$work/run.out" 2>"$work/run.err"
rc=$?
set -e
cat "$work/run.err" >&2
if grep -q '^Traceback' "$work/run.err"; then
  fail "fetcher run crashed in the image (traceback above)"
fi
# One job (missing.txt, 404) is meant to fail: exit 1.
[ "$rc" = 1 ] || fail "fetcher run exited $rc, expected 1 (one job answers 404)"
[ -s "$data/out.jsonl" ] || fail "fetcher run wrote no results file"
owner=$(stat -c %u "$data/out.jsonl")
if [ "$owner" != "$uid" ] || [ "$owner" = 0 ]; then
  fail "results file is owned by uid $owner, expected the image user $uid"
fi

if ! python3 - "$data/out.jsonl" "$www/hello.txt" "$mail" <<'EOF'
import hashlib, json, sys

path, hello_path, mail = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
lines = open(path, encoding="utf-8").read().splitlines()
results = {}
for line in lines:
    r = json.loads(line)
    assert r["id"] not in results, f"duplicate result for {r['id']}"
    results[r["id"]] = r
want = {"hello", "json", "missing"} | ({"mail"} if mail else set())
assert set(results) == want, f"result ids {sorted(results)}, expected {sorted(want)}"
assert len(lines) == len(want), f"{len(lines)} lines for {len(want)} jobs"

hello = results["hello"]
body = open(hello_path, "rb").read()
assert hello["ok"] is True and hello["status"] == 200 and hello["error"] is None, hello
assert hello["kind"] == "http" and hello["attempts"] == 1, hello
assert hello["body"] == body.decode() and hello["sha256"] == hashlib.sha256(body).hexdigest(), hello
js = results["json"]
assert js["ok"] is True and js["status"] == 200 and js["body"] == {"answer": 42}, js
missing = results["missing"]
assert missing["ok"] is False and missing["status"] == 404, missing
assert missing["error"]["type"] == "http_status", missing
if mail:
    m = results["mail"]
    assert m["kind"] == "mail" and m["ok"] is True and m["status"] == 250, m
    assert m["recipients"] == ["user@example.com"], m
for r in results.values():
    print(f"  {r['id']}: ok={r['ok']} status={r.get('status')}", file=sys.stderr)
EOF
then
  sed 's/^/  out.jsonl: /' "$data/out.jsonl" >&2
  fail "result lines are not as expected"
fi
if [ "$mail" = 1 ]; then
  grep -q "container smoke $$" "$work/smtp.log" || fail "the SMTP sink did not receive the message"
fi

# ---- HEALTHCHECK: harmless in batch mode, checks /healthz when FETCHER_METRICS_PORT is set -----
step "healthcheck"
mapfile -t hc < <(inspect '{{json .Config.Healthcheck}}' | python3 -c '
import json, sys
hc = json.load(sys.stdin) or {}
test = hc.get("Test") or []
if test[:1] == ["CMD"]:
    print("\n".join(test[1:]))
elif test[:1] == ["CMD-SHELL"]:
    print("/bin/sh\n-c\n" + test[1])
')
[ "${#hc[@]}" -gt 0 ] || fail "the image has no HEALTHCHECK"
in_image "$c" -- "${hc[@]}" || fail "HEALTHCHECK fails in batch mode (no FETCHER_METRICS_PORT)"
in_image --env "FETCHER_METRICS_PORT=$http_port" "$c" -- "${hc[@]}" \
  || fail "HEALTHCHECK fails although /healthz answers 200"
dead_port=$(free_port)
if in_image --env "FETCHER_METRICS_PORT=$dead_port" "$c" -- "${hc[@]}" 2>/dev/null; then
  fail "HEALTHCHECK passes with nothing listening on FETCHER_METRICS_PORT"
fi

# ---- a long-running fetcher in the image: its metrics, and the HEALTHCHECK against them --------
# The batch run above never loads the worker, the metrics or their dependencies.
step "worker and metrics modules"
in_image "$c" -- python3 -c 'import redis, hiredis, prometheus_client, fetcher.worker, fetcher.metrics' \
  || fail "the worker or metrics modules (or redis, hiredis, prometheus_client) do not import"

step "a running fetcher's /healthz, through the image's HEALTHCHECK"
# A server that takes connections and never answers: the job stays in flight until it stops.
hang_port=$(free_port)
python3 - "$hang_port" >"$work/hang.log" 2>&1 <<'EOF' &
import socket, sys

server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
held = []
while True:
    held.append(server.accept()[0])
EOF
hang_pid=$!
pids+=("$hang_pid")
wait_port "$hang_port" || fail "the never-answering server did not start"
printf '{"id": "slow", "url": "http://127.0.0.1:%s/never", "timeout": 60, "retries": 0}\n' \
  "$hang_port" >"$data/slow.jsonl"

# Worker mode (what the HEALTHCHECK is for) when redis-server is here; else `fetcher run`.
if command -v redis-server >/dev/null; then
  mode=worker
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    >"$work/redis.log" 2>&1 &
  pids+=($!)
  wait_port "$redis_port" || fail "redis-server did not start"
  redis_url=redis://127.0.0.1:$redis_port/0
  in_image "$c" -- fetcher enqueue /data/slow.jsonl --redis "$redis_url" >"$work/enqueue.txt" 2>&1 || {
    cat "$work/enqueue.txt" >&2
    fail "fetcher enqueue failed in the image"
  }
  long=(fetcher worker --redis "$redis_url" --drain -o /data/slow-out.jsonl)
  want_rc=0
else
  mode=run
  echo "redis-server is not installed: fetcher run stands in for fetcher worker" >&2
  long=(fetcher run /data/slow.jsonl -o /data/slow-out.jsonl)
  want_rc=1 # the job fails
fi
metrics_port=$(free_port)
# The port only by FETCHER_METRICS_PORT, as the README says to: the HEALTHCHECK reads it there.
in_image --env "FETCHER_METRICS_PORT=$metrics_port" "$c" -- "${long[@]}" \
  >"$work/long.out" 2>"$work/long.err" &
long_pid=$!
pids+=("$long_pid")
if ! python3 - "$metrics_port" "$mode" <<'EOF'; then
import re, sys, time, urllib.request

base, mode = f"http://127.0.0.1:{sys.argv[1]}", sys.argv[2]
want = [r"fetcher_jobs_in_flight 1(\.0)?"]
if mode == "worker":
    want.append(r"fetcher_redis_up 1(\.0)?")
deadline = time.monotonic() + 60
page = ""
while not all(re.search(f"^{w}$", page, re.M) for w in want):
    if time.monotonic() > deadline:
        sys.exit(f"/metrics never showed {want}; last page:\n{page}")
    time.sleep(0.2)
    try:
        page = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    except OSError:
        pass
for path in ("/healthz", "/readyz"):
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        assert resp.status == 200, (path, resp.status)
print(f"  fetcher {mode}: one job in flight; /healthz and /readyz answer 200", file=sys.stderr)
EOF
  cat "$work/long.err" >&2
  fail "fetcher $mode in the image did not serve its metrics as expected"
fi
in_image --env "FETCHER_METRICS_PORT=$metrics_port" "$c" -- "${hc[@]}" \
  || fail "HEALTHCHECK fails although fetcher $mode answers on /healthz"

# Closing the never-answering server fails the job, which ends the run (and drains the worker).
kill "$hang_pid"
wait "$hang_pid" 2>/dev/null || true
set +e
wait "$long_pid"
rc=$?
set -e
cat "$work/long.err" >&2
if grep -q '^Traceback' "$work/long.err"; then
  fail "fetcher $mode crashed in the image (traceback above)"
fi
[ "$rc" = "$want_rc" ] || fail "fetcher $mode exited $rc, expected $want_rc"
python3 - "$data/slow-out.jsonl" <<'EOF' || fail "fetcher $mode wrote no failed result for the slow job"
import json, sys

(result,) = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
assert result["id"] == "slow" and result["ok"] is False, result
EOF
if in_image --env "FETCHER_METRICS_PORT=$metrics_port" "$c" -- "${hc[@]}" 2>/dev/null; then
  fail "HEALTHCHECK passes after fetcher $mode has exited"
fi

echo "image: $IMAGE (base $BASE), $((size / 1024 / 1024)) MiB" >&2
