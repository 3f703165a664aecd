"""Writers of tiny, format-exact regression data files (ShapeNet1D, Pascal1D) and of unsafe pickles.

Layout (what ``simt.data.regression`` reads, as the official SiMT code's sources write them):

    <data_dir>/ShapeNet1D/train_data_large.pkl, val_data.pkl, test_data.pkl
    <data_dir>/Pascal1D/train_data_ins.pkl, val_data_ins.pkl

Each file is a pickled pair ``(images, labels)``: images uint8 grey 128x128, indexable
``[object][sample]``; labels ``[object][sample]`` -> K numbers, the last the azimuth as a fraction of
a turn in [0, 1). Pascal1D's generator writes per-object lists of (128, 128) uint8 images (PNG
reads) and label rows ``[x_pos, (y_pos + 1) / 2, angle / 2pi]`` (K = 3) as Python floats.

Every writer returns the ground truth ``{split: (images uint8 (objects, samples, S, S, 1),
fraction float64 (objects, samples))}`` so tests can compare what the loaders read.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

SHAPENET1D_FILES = {"train": "train_data_large.pkl", "val": "val_data.pkl", "test": "test_data.pkl"}
PASCAL1D_FILES = {"train": "train_data_ins.pkl", "val": "val_data_ins.pkl"}
LAYOUTS = ("array", "lists", "stacks", "py2")


def make_objects(objects: int, samples: int, image_size: int = 128, seed: int = 0):
    """Random distinct images uint8 (objects, samples, S, S, 1) and azimuth fractions in [0, 1)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(objects, samples, image_size, image_size, 1), dtype=np.uint8)
    fraction = rng.uniform(0.0, 1.0, size=(objects, samples))
    return images, fraction


# ---------------------------------------------------------------------------------------------
# A minimal Python 2 style pickler (protocol 2, py2 `str` for raw bytes, numpy.core module names)
# ---------------------------------------------------------------------------------------------


def _py2_str(b: bytes) -> bytes:  # a py2 8-bit str: SHORT_BINSTRING / BINSTRING
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _py2_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _py2_dtype(dt: np.dtype) -> bytes:
    order = "|" if dt.itemsize == 1 else "<"
    state = [_py2_int(3), _py2_str(order.encode()), b"N", b"N", b"N", _py2_int(-1), _py2_int(-1), _py2_int(0)]
    return (b"cnumpy\ndtype\n" + _py2_tuple([_py2_str(dt.str[1:].encode()), _py2_int(0), _py2_int(1)]) + b"R"
            + _py2_tuple(state) + b"b")


def _py2_obj(obj) -> bytes:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        assert a.dtype.byteorder in "|=<" and a.dtype.kind in "uif"
        return (b"cnumpy.core.multiarray\n_reconstruct\n"
                + _py2_tuple([b"cnumpy\nndarray\n", _py2_tuple([_py2_int(0)]), _py2_str(b"b")]) + b"R"
                + _py2_tuple([_py2_int(1), _py2_tuple([_py2_int(d) for d in a.shape]),
                              _py2_dtype(a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype),
                              b"\x89", _py2_str(a.tobytes())]) + b"b")
    if isinstance(obj, list):
        return b"]" + (b"(" + b"".join(_py2_obj(o) for o in obj) + b"e" if obj else b"")
    if isinstance(obj, tuple):
        return _py2_tuple([_py2_obj(o) for o in obj])
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, int):
        return _py2_int(obj)
    raise TypeError(f"py2 fixture pickler: unsupported {type(obj).__name__}")


def dump_py2(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` (nested lists/tuples of numpy arrays, floats, ints) as Python 2 + numpy 1 did."""
    Path(path).write_bytes(b"\x80\x02" + _py2_obj(obj) + b".")


# ---------------------------------------------------------------------------------------------
# Data set writers
# ---------------------------------------------------------------------------------------------


def write_pair(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, layout: str = "array",
               protocol: int = 4, squeeze_channel: bool = False) -> Path:
    """Pickle ``(images, labels)`` in one of the real layouts.

    layout: "array" (two ndarrays, images (O, S, H, W[, 1]), labels (O, S, K)); "lists" (per-object
    lists of per-sample image arrays and of label rows as Python floats, as Pascal1D's generator);
    "stacks" (a list of per-object (S, H, W[, 1]) arrays and one of (S, K) label arrays); "py2" (the
    "lists" layout written as a Python 2 pickle with numpy.core names and 8-bit str array data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs = images[..., 0] if squeeze_channel else images
    if layout == "array":
        obj = (imgs, labels)
    elif layout in ("lists", "py2"):
        obj = [[[imgs[k, i] for i in range(imgs.shape[1])] for k in range(imgs.shape[0])],
               [[[float(v) for v in row] for row in lab] for lab in labels]]
    elif layout == "stacks":
        obj = [[imgs[k] for k in range(imgs.shape[0])], [labels[k] for k in range(labels.shape[0])]]
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    if layout == "py2":
        dump_py2(obj, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol)
    return path


def write_shapenet1d(data_dir: str | os.PathLike, objects: dict[str, int] | None = None, samples: int = 6,
                     image_size: int = 128, label_columns: int = 1, layout: str = "array", protocol: int = 4,
                     seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``<data_dir>/ShapeNet1D/{train_data_large,val_data,test_data}.pkl``; returns the ground truth."""
    objects = objects or {"train": 4, "val": 3, "test": 3}
    truth = {}
    for j, (split, n) in enumerate(objects.items()):
        images, fraction = make_objects(n, samples, image_size, seed + j)
        rng = np.random.default_rng(seed + 100 + j)
        labels = np.concatenate([rng.uniform(-1, 1, size=(n, samples, label_columns - 1)), fraction[..., None]],
                                axis=2)
        write_pair(Path(data_dir) / "ShapeNet1D" / SHAPENET1D_FILES[split], images, labels, layout, protocol)
        truth[split] = (images, fraction)
    return truth


def write_pascal1d(data_dir: str | os.PathLike, objects: dict[str, int] | None = None, samples: int = 6,
                   image_size: int = 128, layout: str = "lists", protocol: int = 2, squeeze_channel: bool = True,
                   seed: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``<data_dir>/Pascal1D/{train,val}_data_ins.pkl`` with K = 3 label rows; returns the ground truth."""
    objects = objects or {"train": 4, "val": 3}
    truth = {}
    for j, (split, n) in enumerate(objects.items()):
        images, fraction = make_objects(n, samples, image_size, seed + j)
        # [x_pos, (y_pos + 1) / 2, angle / 2pi] as the generator normalizes them (x = 0.5, y = 0).
        labels = np.stack([np.full((n, samples), 0.5), np.full((n, samples), 0.5), fraction], axis=2)
        write_pair(Path(data_dir) / "Pascal1D" / PASCAL1D_FILES[split], images, labels, layout, protocol,
                   squeeze_channel=squeeze_channel)
        truth[split] = (images, fraction)
    return truth


# ---------------------------------------------------------------------------------------------
# Unsafe pickles
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls ``func(*args)`` (the classic pickle code-execution gadget)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle insists that a reduce "function" be callable
        raise AssertionError("never called while pickling")


def payloads(marker: str | os.PathLike) -> dict[str, object]:
    """Objects whose unpickling would create the file ``marker``, by different globals."""
    marker = os.fspath(marker)
    return {
        "builtins.exec": _Payload(exec, f"open({marker!r}, 'w').close()"),
        "posix.system": _Payload(os.system, f"touch '{marker}'"),
        # getattr(Path(marker), "touch")() : a bound-method gadget
        "builtins.getattr": _Payload(_Payload(getattr, Path(marker), "touch")),
        # A numpy function that is not an array constructor (writes a text file).
        "numpy.savetxt": _Payload(np.savetxt, marker, np.zeros(1)),
    }


def write_malicious_pickle(path: str | os.PathLike, marker: str | os.PathLike, kind: str = "builtins.exec",
                           nested: bool = False, protocol: int = 2) -> Path:
    """A pickle that creates ``marker`` when loaded with plain ``pickle.load``.

    nested=True hides the payload inside an otherwise valid (images, labels) pair, after a real array.
    """
    payload = payloads(marker)[kind]
    obj = payload
    if nested:
        images, fraction = make_objects(2, 3, 128)
        obj = (images, [[[0.1], [0.2], [0.3]], [[0.4], payload, [0.6]]])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)
    return path
