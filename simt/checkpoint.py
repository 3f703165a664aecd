"""Checkpoints: one dict per file, written atomically so a crash or a kill never leaves a torn file; and the
lock that keeps two processes from training in one run directory."""
import contextlib
import fcntl
import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LAST = "last.pt"  # everything needed to resume, rewritten every trainer.checkpoint_every steps
BEST = "best.pt"  # the weights chosen by validation, used for the final test
LOCK = "run.lock"  # held (flock) by the process training in the directory; the kernel frees it when it dies


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unwritable or does not fit this run; one line naming the file."""


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX). A write that
    fails (a full disk, a read-only folder) leaves the previous file as it was and no temp file behind."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # RuntimeError: torch's writer, when a write under it failed
        kept = "; the previous file is kept" if path.is_file() else ""
        raise CheckpointError(f"checkpoint {path}: could not be written ({_write_failure(error)}){kept}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # gone already when the rename succeeded
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_failure(error: BaseException) -> str:
    """Why a write failed, in words: the OSError behind it (torch's writer reports a failed write as a
    RuntimeError about file positions, raised while handling the OSError), else the error's first line."""
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if cause is not None:
        return cause.strerror or str(cause)
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


def load(path: Path) -> dict:
    """Load a checkpoint onto the CPU (RNG states must stay there; load_state_dict moves the weights).

    Tensors and plain containers only (weights_only): a file holding other objects is refused, since loading
    them could run code. Every failure is a one-line CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: could not be read ({error.strerror or error})") from None
    except Exception as error:  # torn or foreign; torch's own text would advise weights_only=False: never repeat it
        unsafe = _unsafe_globals(path) if isinstance(error, pickle.UnpicklingError) else []
        if unsafe:
            named = ", ".join(unsafe[:3]) + (", ..." if len(unsafe) > 3 else "")
            raise CheckpointError(f"checkpoint {path}: refused, it holds objects other than tensors and plain "
                                  f"containers ({named}), and loading it could run code") from None
        raise CheckpointError(f"checkpoint {path}: unreadable (not a checkpoint written by this tool, or damaged: "
                              f"{type(error).__name__})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path}: unreadable (not a checkpoint written by this tool: it holds a "
                              f"{type(payload).__name__}, not a dict)")
    return payload


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a torch.save file names beyond tensors and plain containers, read from the
    pickle's opcodes without running any; [] when there are none or the file is no torch.save archive."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # damaged or foreign in its own way: the caller reports the file as unreadable
        return []


@contextlib.contextmanager
def restoring(path: Path):
    """Around restoring state from the checkpoint at `path`: one that does not fit this run (a missing key, tensors
    of other shapes, e.g. a last.pt of a run with another backbone.hidden) becomes a one-line CheckpointError."""
    try:
        yield
    except (CheckpointError, torch.cuda.OutOfMemoryError):
        raise  # already one line; not the checkpoint's fault
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path}: does not fit this run (missing key {error})") from None
    except (RuntimeError, ValueError, TypeError) as error:
        # load_state_dict's text opens with "Error(s) in loading state_dict for X:", the first problem on the next line
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else _first_line(error)
        raise CheckpointError(f"checkpoint {path}: does not fit this run ({type(error).__name__}: {detail})") from None


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
