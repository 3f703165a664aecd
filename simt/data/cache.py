"""Where built data sets are cached, and the load-or-build step every embedded or decoded set shares."""
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$SIMT_CACHE`` if set, else ``$XDG_CACHE_HOME/simt``, else ``~/.cache/simt`` (never the checkout)."""
    if os.environ.get("SIMT_CACHE"):
        return Path(os.environ["SIMT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "simt"
    return Path.home() / ".cache" / "simt"


def load_or_build(path: Path, read: Callable[[], T | None], build: Callable[[], T], write: Callable[[T], None],
                  what: str) -> T:
    """`read()` the cache (None when missing or corrupt), else `build()` and `write()` it.

    An unwritable cache only warns: the data just built is returned all the same.
    """
    data = read()
    if data is None:
        data = build()
        try:
            write(data)
        except OSError as exc:
            warnings.warn(f"could not write the {what} cache {path}: {exc}", RuntimeWarning, stacklevel=3)
    return data


def save_npz_atomic(path: Path, payload: dict) -> None:
    """np.savez to a temp file in the same folder, fsync, then rename: readers never see a torn cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
