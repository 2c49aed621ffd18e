#!/usr/bin/env bash
# Installs one backend's environment into the image: `install.sh <the backend's image folder>`.
# Debian packages first (system-packages.txt, where the backend needs some), then exactly the
# packages its lock names. --no-deps: the lock already holds every dependency, resolved once by
# images/lock.sh, so nothing is resolved again at build time.
set -euo pipefail
folder=$1
if [[ -f $folder/system-packages.txt ]]; then
    # Not pinned: Debian retires superseded versions with each security update, which would
    # break every rebuild.
    mapfile -t packages < <(grep -v '^#' "$folder/system-packages.txt" | tr ' ' '\n' | grep .)
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    rm -rf /var/lib/apt/lists/*
fi
lock=$folder/requirements.txt
# GPU (a build argument): the backend's GPU variant, where it has one.
if [[ ${GPU:-false} == true && -f $folder/requirements-gpu.txt ]]; then
    lock=$folder/requirements-gpu.txt
fi
pip install --quiet --no-deps -r "$lock"
