"""Loading data pickles safely: only numpy arrays, numpy scalars and builtin containers.

The regression pickles (ShapeNet1D, Pascal1D) and some image-set files (Ren et al.'s mini/tiered-ImageNet)
are Python pickles. A pickle can name any importable callable, so a crafted file could run code when
loaded with `pickle.load`; this unpickler refuses every global that array data does not need.
"""
from __future__ import annotations

import codecs
import collections
import functools
import importlib
import os
import pickle
from typing import Any

import numpy as np


class DataError(ValueError):
    """A missing, malformed or unsafe data file. The message is one line naming the file."""

    def __init__(self, path: str | os.PathLike | None, message: str | None = None):
        # DataError(path, message) names the file; DataError(message) (also how pickle rebuilds it) is
        # taken as the whole text.
        text = str(path) if message is None else (f"{os.fspath(path)}: {message}" if path is not None else message)
        # One line whatever the underlying error said (h5py, zipfile and numpy messages can span lines).
        super().__init__(" ".join(text.split()))


def _fail(path: str | os.PathLike, what: str) -> DataError:
    return DataError(path, what)


_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_NUMPY_SUBMODULES = {
    # numpy < 2 wrote numpy.core.*, numpy >= 2 writes numpy._core.*; both hold the same functions.
    "numpy.core.multiarray": ("multiarray", {"_reconstruct", "scalar"}),
    "numpy._core.multiarray": ("multiarray", {"_reconstruct", "scalar"}),
    "numpy.core._multiarray_umath": ("multiarray", {"_reconstruct", "scalar"}),
    "numpy._core._multiarray_umath": ("multiarray", {"_reconstruct", "scalar"}),
    "numpy.core.numeric": ("numeric", {"_frombuffer"}),  # protocol 5 array pickles
    "numpy._core.numeric": ("numeric", {"_frombuffer"}),
}
_NUMPY_TOP = {"ndarray": np.ndarray, "dtype": np.dtype}
_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in ("set", "frozenset", "bytearray", "bytes", "complex", "list", "tuple", "dict", "int",
                 "float", "str", "bool")
}
_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: Python 3 writes ``bytes`` as ``encode(text, 'latin1')`` for
    pickle protocols <= 2 (the raw data of every numpy array). Only that use is allowed."""
    if not isinstance(obj, str) or str(encoding).lower() not in _LATIN1 or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as encode(str, 'latin1'), "
                                     f"got encoding {encoding!r}")
    return codecs.encode(obj, "latin1")


@functools.lru_cache(maxsize=None)
def _numpy_module(kind: str):
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return importlib.import_module(prefix + kind)
        except ImportError:
            continue
    raise ImportError(f"numpy has no {kind} module")  # pragma: no cover


def _allowed_global(module: str, name: str) -> Any | None:
    """The object a pickle may reference as ``module.name``, or None when it is not allowed."""
    module = _MODULE_ALIASES.get(module, module)
    if module == "builtins":
        return _BUILTINS.get(name)
    if module == "numpy":
        return _NUMPY_TOP.get(name)
    if module in _NUMPY_SUBMODULES:
        kind, names = _NUMPY_SUBMODULES[module]
        return getattr(_numpy_module(kind), name) if name in names else None
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # latin1: Python 2 pickles store array data as 8-bit str; numpy decodes it back from latin1.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            module = _MODULE_ALIASES.get(module, module)
            raise _fail(self._path, f"refusing to load the pickled global {module}.{name}: only numpy "
                                    f"arrays and builtin containers are allowed in data files (a foreign "
                                    f"or crafted pickle?)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _fail(self._path, "refusing a pickle with persistent ids: only numpy arrays and builtin "
                                "containers are allowed in data files")


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a data file that may only contain numpy arrays, numpy scalars and builtin containers.

    Python 2 era pickles are read with ``encoding="latin1"`` (what numpy arrays need). Any other
    global stops the load before it is called, so a crafted pickle cannot run code.

    Raises:
        DataError: missing/unreadable file, truncated or corrupt pickle, or a forbidden object;
            a one-line message naming the file.
    """
    p = os.fspath(path)
    try:
        fh = open(p, "rb")
    except FileNotFoundError:
        raise _fail(p, "missing file") from None
    except OSError as exc:
        raise _fail(p, f"cannot open ({exc.strerror or exc})") from None
    with fh:
        try:
            return _RestrictedUnpickler(fh, p).load()
        except DataError:
            raise
        except MemoryError:
            raise _fail(p, "out of memory while unpickling") from None
        except Exception as exc:  # EOFError, UnpicklingError, ValueError from numpy, ...
            detail = " ".join(str(exc).split())[:200]
            raise _fail(p, f"not a readable pickle ({type(exc).__name__}: {detail}); truncated or corrupt "
                           f"file?") from None
