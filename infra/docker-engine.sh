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

# The Debian archive this host's apt already uses (its sources, one-line or deb822), so a host
# behind a mirror or proxy of its own builds through it; none is assumed.
host_debian_uri() {
    local kind=$1  # archive | security
    local files=() file
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for file in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $file ]] && files+=("$file")
    done
    ((${#files[@]})) || return 0
    # A deb822 stanza's URIs and Suites, or a one-line entry's URI and suite; security suites
    # end in -security.
    awk -v kind="$kind" '
        function pick(uri, suites) {
            if (uri == "" || suites == "") return
            security = suites ~ /-security/
            if (!found && (kind == "security") == security) { print uri; found = 1 }
        }
        /^[[:space:]]*#/ { next }
        /^deb[[:space:]]/ { sub(/\[[^]]*\][[:space:]]*/, ""); pick($2, $3); next }
        /^URIs:/ { uri = $2 }
        /^Suites:/ { $1 = ""; suites = $0 }
        /^Types:.*deb([[:space:]]|$)/ { deb = 1 }
        /^[[:space:]]*$/ { if (deb) pick(uri, suites); uri = ""; suites = ""; deb = 0 }
        END { if (deb) pick(uri, suites) }
    ' "${files[@]}"
}

stand_in_base_image() {
    install_packages debootstrap:debootstrap
    local rootfs mirror security
    mirror=$(host_debian_uri archive)
    security=$(host_debian_uri security)
    if [[ -z $mirror ]]; then
        log "no registry answered for $BASE_IMAGE, and this host's apt sources name no Debian archive to"
        log "build a stand-in from: add one to /etc/apt/sources.list.d/, or make $BASE_IMAGE pullable"
        exit 1
    fi
    ROOTFS=$(mktemp -d)
    rootfs=$ROOTFS
    log "building a stand-in $BASE_IMAGE from Debian's packages ($mirror, this host's apt archive)"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    # The image's own sources: bookworm, from the same archive (and security archive) as the host.
    rm -f "$rootfs/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$mirror"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        if [[ -n $security ]]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\n' "$security"
            printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        fi
    } >"$rootfs/etc/apt/sources.list.d/debian.sources"
    # The certificate authorities this host added to its own trust (a TLS proxy of its own, say):
    # the image's pip reaches the same package index through the same path as the host's.
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$rootfs/usr/local/share/ca-certificates/" \; \
        2>/dev/null || true
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
