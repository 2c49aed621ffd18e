"""Environments built from a backend image's own install files, the way its container is built.

Each image folder holds `requirements.txt` and, where pip alone cannot get it right, an
`install.sh` that the Dockerfile runs too. An environment is cached outside the clone, keyed by a
hash of those files, so only the first test run pays for the build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CHORUS_ENV_CACHE", Path.home() / ".cache" / "chorus-test-envs"))


def _install_files(image: str) -> list[Path]:
    folder = ROOT / "images" / image
    return [p for p in (folder / "requirements.txt", folder / "install.sh") if p.is_file()]


def image_env(image: str) -> Path:
    """The Python executable of an environment built from `images/<image>/`."""
    files = _install_files(image)
    if not files:
        raise FileNotFoundError(f"images/{image} has no requirements.txt")
    digest = hashlib.sha256(sys.version.encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    env = CACHE / f"{image}-{digest.hexdigest()[:16]}"
    python = env / "bin" / "python"
    if (env / ".complete").exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{image}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (env / ".complete").exists():
            return python
        shutil.rmtree(env, ignore_errors=True)
        venv.EnvBuilder(with_pip=True).create(env)
        run_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        install_script = ROOT / "images" / image / "install.sh"
        if install_script.is_file():
            command = ["bash", str(install_script), str(python)]
        else:
            command = [str(python), "-m", "pip", "install", "--quiet", "-r",
                       str(ROOT / "images" / image / "requirements.txt")]
        subprocess.run(command, check=True, cwd=ROOT / "images" / image, env=run_env)
        (env / ".complete").touch()
    return python
