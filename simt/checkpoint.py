"""Checkpoints: one dict per file, written atomically so a crash or a kill never leaves a torn file; and the
lock that keeps two processes from training in one run directory."""
import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LAST = "last.pt"  # everything needed to resume, rewritten every trainer.checkpoint_every steps
BEST = "best.pt"  # the weights chosen by validation, used for the final test
LOCK = "run.lock"  # held (flock) by the process training in the directory; the kernel frees it when it dies


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


@contextlib.contextmanager
def hold_run_dir(run_dir: Path):
    """Hold the run directory's lock while training in it: a second process there (a resume started while
    the first still runs, a sweep retrying a trial whose job outlived its sweep) would interleave both
    processes' checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            handle.seek(0)
            raise CheckpointError(f"run directory {run_dir} is in use by another process (pid "
                                  f"{handle.read().strip() or '?'}): wait for it to end, or use another "
                                  f"directory") from None
        except OSError as error:  # a file system without locks (some network mounts): train unguarded
            locked = False
            log.warning("run directory %s cannot be locked (%s): nothing keeps a second process out", run_dir, error)
        if locked:
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
        yield


def run_dir_in_use(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock (see hold_run_dir)."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return False
    with open(path) as handle:
        try:  # shared: needs only read access (NFS's emulated flock refuses an exclusive one on a read-only file)
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no locks on this file system: nobody can be seen holding one
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
