"""Where a model downloaded from the Hugging Face hub lies in its cache, so that a tiny model saved
there stands in for the download: `from_pretrained("<repo>")` then finds it offline. Standard
library only: the builders import it inside the backends' images."""

from __future__ import annotations

from pathlib import Path


def snapshot(hf_home: Path, repo: str) -> Path:
    """The snapshot folder of `repo` under the cache at `hf_home` (its `refs/main` written)."""
    cached = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    revision = "0" * 40
    (cached / "refs").mkdir(parents=True, exist_ok=True)
    (cached / "refs" / "main").write_text(revision)
    return cached / "snapshots" / revision
