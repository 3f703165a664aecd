"""Checkpoints: one dict per file, written atomically so a crash or a kill never leaves a torn file."""
import os
import tempfile
from pathlib import Path

import torch

LAST = "last.pt"  # everything needed to resume, rewritten every trainer.checkpoint_every steps
BEST = "best.pt"  # the weights chosen by validation, used for the final test


class CheckpointError(ValueError):
    """A checkpoint that is missing or unreadable; the message names the file."""


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict:
    """Load a checkpoint onto the CPU (RNG states must stay there; load_state_dict moves the weights).

    Tensors and plain containers only (weights_only), so a crafted file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torn or foreign file: say which and why in one line
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
