#!/usr/bin/env bash
# A Docker engine for building and running Chorus's images, on a Debian host with or without one.
#   infra/docker-engine.sh start   engine up (Debian's docker.io installed and dockerd started where
#                                  missing) and the base image present; prints nothing else on success
#   infra/docker-engine.sh stop    stops dockerd, only if `start` started it
# The base image is the real python:3.11-slim-bookworm where a registry can be reached; where none
# can, a stand-in built from Debian's own packages under the same tag (Debian's Python 3.11).
set -euo pipefail

BASE_IMAGE=python:3.11-slim-bookworm
STATE_DIR=${CHORUS_DOCKER_STATE:-/run/chorus-docker}
PIDFILE=$STATE_DIR/dockerd.pid

log() { echo "docker-engine: $*" >&2; }

engine_answers() { docker info >/dev/null 2>&1; }

install_packages() {
    local missing=()
    for command_and_package in "$@"; do
        command -v "${command_and_package%%:*}" >/dev/null 2>&1 || missing+=("${command_and_package#*:}")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_engine() {
    engine_answers && return 0
    install_packages dockerd:docker.io iptables:iptables docker:docker.io
    mkdir -p "$STATE_DIR"
    log "starting dockerd (log: $STATE_DIR/dockerd.log)"
    # No systemd here: dockerd runs detached from this shell; --pidfile records its own pid.
    setsid dockerd --pidfile "$PIDFILE" >"$STATE_DIR/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 120); do
        engine_answers && return 0
        sleep 0.5
    done
    log "dockerd did not answer within 60 s; its log ends:"
    tail -n 20 "$STATE_DIR/dockerd.log" >&2
    exit 1
}

ROOTFS=""
remove_rootfs() {
    [[ -n $ROOTFS ]] || return 0
    umount "$ROOTFS/dev/pts" "$ROOTFS/proc" 2>/dev/null || true
    rm -rf "$ROOTFS"
}
trap remove_rootfs EXIT

stand_in_base_image() {
    install_packages debootstrap:debootstrap
    local sources rootfs
    ROOTFS=$(mktemp -d)
    rootfs=$ROOTFS
    sources=/etc/apt/sources.list.d/debian.sources
    local mirror=http://deb.debian.org/debian
    if [[ -f $sources ]]; then
        mirror=$(awk '/^URIs:/ {print $2; exit}' "$sources")
    fi
    log "building a stand-in $BASE_IMAGE from Debian's packages ($mirror)"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    [[ -f $sources ]] && cp "$sources" "$rootfs/etc/apt/sources.list.d/" && rm -f "$rootfs/etc/apt/sources.list"
    # Certificates this host trusts beyond Debian's (a proxy's, a company's) go in too: pip
    # inside a build reaches the package index only with them.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        mkdir -p "$rootfs/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    mount -t proc proc "$rootfs/proc"
    mount -t devpts devpts "$rootfs/dev/pts"
    # A clean environment: this host's pip and proxy settings are not the image's. libpython: the
    # official image's Python is a shared build, and extensions such as torchcodec's link it.
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 chroot "$rootfs" /bin/sh -ec '
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            ca-certificates netbase tzdata python3.11 python3.11-venv libpython3.11 >/dev/null
        update-ca-certificates >/dev/null
        apt-get clean
        rm -rf /var/lib/apt/lists/*
        # python and pip on PATH, installing system-wide, as in the official image; a current
        # pip resolves as a user'"'"'s build would.
        python3.11 -m venv /usr/local
        printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" >/etc/pip.conf
        /usr/local/bin/pip install --quiet --disable-pip-version-check --upgrade pip
    '
    umount "$rootfs/dev/pts" "$rootfs/proc"
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        -c 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    remove_rootfs
    ROOTFS=""
}

ensure_base_image() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
    if timeout 60 docker pull --quiet "$BASE_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    stand_in_base_image
}

stop_engine() {
    [[ -f $PIDFILE ]] || return 0
    local pid
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    rm -f "$PIDFILE"
}

case "${1:-}" in
    start) start_engine; ensure_base_image ;;
    stop) stop_engine ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
