"""Where a backend's weights run, chosen once they are loaded, never at import or load.

On Modal, backends import and load before a memory snapshot, where no GPU is attached; a CUDA
query there would initialise CUDA with no device and leave the model on the CPU of a billed GPU
container. So `load()` keeps weights in host memory and `Backend.to_device()` moves them after
the snapshot is restored, asking CUDA for the first time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def best_device() -> str:
    """"cuda" where a GPU is attached, else "cpu". The first CUDA query of the process."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def cuda_hidden() -> Iterator[None]:
    """For importing a library that picks its device at import (VALL-E X's generation module,
    Parler-TTS's audiotools): it is told there is no GPU, without CUDA being asked, and the
    backend moves the weights in `to_device()`."""
    import torch

    is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        yield
    finally:
        torch.cuda.is_available = is_available
