"""Loaders for the paper's few-shot classification data sets, read from files users already have.

Each public loader returns ``{split: ImageSplit}``: one uint8 array of 84x84 RGB images per split,
sorted so that each class's images are contiguous, plus the class offsets and names. Sampling a task
from it costs no decoding.

Accepted layouts (under the data set's folder, e.g. ``<data_dir>/miniimagenet/``), detected in this
order, per split:

mini-ImageNet (64/16/20 classes, 600 images each)
  1. torchmeta: ``{split}_data.hdf5`` with group ``datasets`` holding one uint8 dataset
     ``(n, 84, 84, 3)`` per class, named by the class; ``{split}_labels.json`` lists the class names.
  2. Ren et al. / learn2learn: ``mini-imagenet-cache-{split}.pkl`` (``val`` may be named
     ``validation``), a dict ``{"image_data": uint8 (N, 84, 84, 3) RGB, "class_dict": {class: [indices]}}``.
  3. Ravi & Larochelle: ``{split}.csv`` (header ``filename,label``) and an ``images/`` folder of JPEGs
     (resized to 84x84 with Lanczos when they are not, as the usual preprocessing script does).
tiered-ImageNet (351/97/160 classes)
  1. torchmeta: ``{split}_data.hdf5``, group ``datasets``, one 1-D dataset of variable-length uint8
     (PNG bytes, one per image) per class; ``{split}_labels.json`` lists the class names.
  2. MetaOptNet / FEAT: ``{split}_images.npz`` (array ``images``, uint8 (N, 84, 84, 3), **BGR**) and
     ``{split}_labels.pkl`` (Ren's keys ``label_specific`` + ``label_specific_str``, or MetaOptNet's
     ``labels``).
  3. Ren et al.'s original archive: ``{split}_images_png.pkl`` (list of PNG byte arrays) and
     ``{split}_labels.pkl``.
CUB (torchmeta): ``{split}_data.hdf5`` (group ``datasets``, one variable-length uint8 dataset of JPEG
  bytes per class) + ``{split}_labels.json``. Decoded as the official code: shorter side resized to 126
  (bilinear), then the centre 84x84 crop.
Cars (the layout SiMT's ``data/cars.py`` reads): ``{split}_data.hdf5`` with group ``datasets``, one
  ``(n, 84, 84, 3)`` dataset per class (float32 with values 0..255, as h5py's default dtype stores them,
  or uint8) + ``{split}_labels.json``.

Sources stored encoded (PNG/JPEG bytes or files) are decoded once, with a progress bar, into a
memory-mapped ``.npy`` in the cache folder (see :func:`image_cache_dir`), keyed by the sources' absolute
paths, sizes and mtimes. Already-decoded sources are read straight into memory.

Colour order: tiered-ImageNet's ``.npz`` images were made with OpenCV (``cv2.imread`` then, in Ren et
al.'s ``compress_tiered_imagenet.py``, ``cv2.imdecode``), which yields BGR; loaders of that file flip
the channels (e.g. few-shot-meta-baseline's ``data[:, :, :, ::-1]``). We flip them to RGB by default.
The PNG bytes of the torchmeta HDF5 and of ``*_images_png.pkl`` were written by ``cv2.imencode`` from
BGR arrays, i.e. they are correct PNGs, and PIL decodes them to RGB. mini-ImageNet's pickle was built
with ``cv2.imread(...)[:, :, [2, 1, 0]]``: already RGB.

Every problem with the input files raises :class:`DataError`, a one-line message naming the file and
what was expected.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import secrets
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from simt.data.cache import default_cache_dir
from simt.data.safe_pickle import DataError, safe_load_pickle

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DataError",
    "EXPECTED_CLASSES",
    "IMAGE_SIZE",
    "ImageSplit",
    "LOADERS",
    "SPLITS",
    "default_cache_dir",
    "describe",
    "image_cache_dir",
    "load_cars",
    "load_cub",
    "load_miniimagenet",
    "load_tieredimagenet",
    "safe_load_pickle",
]

log = logging.getLogger(__name__)

IMAGE_SIZE = 84
SPLITS = ("train", "val", "test")
# Bump when the decoded content or the cache files change meaning: it is part of every cache key.
CACHE_FORMAT_VERSION = 1
# Class counts of the standard splits (reported, never enforced: fixtures are tiny). Cars: the split
# files of SiMT's Cars HDF5 are not public, so no count is asserted.
EXPECTED_CLASSES: dict[str, dict[str, int] | None] = {
    "miniimagenet": {"train": 64, "val": 16, "test": 20},
    "tieredimagenet": {"train": 351, "val": 97, "test": 160},
    "cub": {"train": 100, "val": 50, "test": 50},
    "cars": None,
}
_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# CUB as the official code: transforms.Resize(int(84 * 1.5)) then transforms.CenterCrop(84).
_CUB_RESIZE = int(IMAGE_SIZE * 1.5)


@dataclass
class ImageSplit:
    """The decoded images of one split.

    Attributes:
        images: uint8 ``(N, 84, 84, 3)`` RGB, sorted so each class's images are contiguous; may be a
            read-only ``np.memmap`` of the decode cache.
        offsets: int64 ``(classes + 1,)``: class ``k``'s images are ``images[offsets[k]:offsets[k+1]]``.
        class_names: ``classes`` names, in class-index order.
    """

    images: np.ndarray
    offsets: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) != len(self.class_names) + 1:
            raise ValueError(f"offsets must have classes + 1 = {len(self.class_names) + 1} entries")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.images) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must rise from 0 to the number of images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_sizes(self) -> np.ndarray:
        """int64 ``(classes,)``: images per class."""
        return np.diff(self.offsets)

    def class_images(self, k: int) -> np.ndarray:
        """uint8 ``(n_k, 84, 84, 3)``: the images of class ``k``."""
        return self.images[self.offsets[k]:self.offsets[k + 1]]


def _str_keys(obj: object) -> object:
    """A dict with bytes keys (Python 2 pickles read with encoding='bytes') gets str keys."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


def _as_str(name: object) -> str:
    return name.decode("latin1") if isinstance(name, bytes) else str(name)


# ---------------------------------------------------------------------------------------------------
# Decode cache
# ---------------------------------------------------------------------------------------------------

def image_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the decoded-image caches: ``<cache_dir or default_cache_dir()>/images``."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "images"


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class _EncodedPlan:
    """A validated split whose images are stored encoded; nothing is decoded yet.

    ``items()`` yields ``(encoded, where)`` in output order: class by class, images in source order.
    ``where`` names the image in error messages.
    """

    dataset: str
    split: str
    layout: str
    transform: str  # "resize84" or "cub" (see _decode_image)
    sources: list[dict]  # _stamp()s (plus digests) of every file the content depends on
    class_names: list[str]
    counts: list[int]
    items: Callable[[], Iterator[tuple[object, str]]]
    # Called once before decoding, only on a cache miss (e.g. to unpickle a large list of PNGs).
    prepare: Callable[[], None] | None = None

    def key(self) -> dict:
        return {"format": CACHE_FORMAT_VERSION, "dataset": self.dataset, "split": self.split,
                "layout": self.layout, "transform": self.transform, "size": IMAGE_SIZE,
                "sources": self.sources}


def _offsets(counts: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def _read_cache(npy: Path, meta_path: Path, key: dict) -> ImageSplit | None:
    """The cached split, or None when missing, stale, truncated or otherwise unreadable."""
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            return None
        offsets = np.asarray(meta["offsets"], dtype=np.int64)
        images = np.load(npy, mmap_mode="r")
        # A truncated or padded .npy can still map: check its exact size and shape.
        if (images.dtype != np.uint8 or images.shape != (int(offsets[-1]), *_SHAPE)
                or npy.stat().st_size != images.offset + images.nbytes):
            raise ValueError("shape or size mismatch")
        return ImageSplit(images, offsets, [str(n) for n in meta["class_names"]])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as exc:
        log.warning("decode cache %s is unreadable (%s): rebuilding it", npy, exc)
        return None


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(folder: Path, plan: _EncodedPlan, keep: str) -> None:
    """Delete older caches of the same split and source paths (their sources changed since)."""
    paths = [s["path"] for s in plan.sources]
    for meta_path in folder.glob(f"{plan.dataset}-{plan.split}-*.json"):
        if meta_path.stem.endswith(keep):
            continue
        try:
            meta = json.loads(meta_path.read_text())
            if [s["path"] for s in meta["key"]["sources"]] != paths:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        meta_path.with_suffix(".npy").unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)


def _decode_all(plan: _EncodedPlan, out: np.ndarray, progress: bool) -> None:
    """Decode every image of ``plan`` into ``out`` (uint8 (N, 84, 84, 3)), with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(out), desc=f"decoding {plan.dataset} {plan.split}", unit="img",
               file=sys.stderr, disable=not progress)
    with bar:
        for i, (encoded, where) in enumerate(plan.items()):
            out[i] = _decode_image(encoded, plan.transform, where)
            bar.update(1)


def _materialize(plan: _EncodedPlan, cache_dir: str | os.PathLike | None, progress: bool) -> ImageSplit:
    """Decode ``plan`` once into a memory-mapped ``.npy`` cache, or reuse that cache."""
    key = plan.key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = image_cache_dir(cache_dir)
    stem = f"{plan.dataset}-{plan.split}-{digest}"
    npy, meta_path = folder / f"{stem}.npy", folder / f"{stem}.json"
    cached = _read_cache(npy, meta_path, key)
    if cached is not None:
        return cached

    if plan.prepare is not None:
        plan.prepare()
    offsets = _offsets(plan.counts)
    shape = (int(offsets[-1]), *_SHAPE)
    tmp = folder / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.npy.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as exc:  # an unwritable cache must not stop training: decode into memory
        tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot write the decode cache in {folder} ({exc}); decoding {plan.dataset} "
                      f"{plan.split} into memory, and again next time", RuntimeWarning, stacklevel=3)
        images = np.empty(shape, dtype=np.uint8)
        _decode_all(plan, images, progress)
        return ImageSplit(images, offsets, plan.class_names)
    try:
        _decode_all(plan, out, progress)
        out.flush()
        del out
        # Write the data first, the sidecar last: a sidecar always describes a complete .npy.
        os.replace(tmp, npy)
        _write_json_atomic(meta_path, {"key": key, "offsets": offsets.tolist(),
                                       "class_names": plan.class_names, "shape": list(shape)})
    finally:
        tmp.unlink(missing_ok=True)
    _remove_stale(folder, plan, digest)
    cached = _read_cache(npy, meta_path, key)
    if cached is None:  # e.g. the file system lost it between the write and the read
        raise DataError(npy, "decode cache could not be read back after writing it")
    return cached


def _decode_image(encoded: object, transform: str, where: str) -> np.ndarray:
    """Decode one encoded image (bytes or a uint8 byte array) to uint8 (84, 84, 3) RGB.

    ``transform``: "resize84" resizes to 84x84 (Lanczos) when the image has another size; "cub"
    resizes the shorter side to 126 (bilinear, the longer side scaled and truncated as torchvision's
    ``Resize(126)``) and keeps the centre 84x84 (torchvision's ``CenterCrop`` rounding).
    """
    from PIL import Image

    data = encoded.tobytes() if isinstance(encoded, np.ndarray) else bytes(encoded)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError...)
        raise DataError(where, f"cannot decode image ({type(exc).__name__}: {exc})") from None
    w, h = img.size
    if transform == "cub":
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = _CUB_RESIZE, int(_CUB_RESIZE * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != (w, h):
            img = img.resize(size, Image.BILINEAR)
        w, h = img.size
        top, left = int(round((h - IMAGE_SIZE) / 2.0)), int(round((w - IMAGE_SIZE) / 2.0))
        img = img.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    elif transform == "resize84":
        if (w, h) != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    else:
        raise ValueError(f"unknown transform {transform!r}")
    return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# Shared file checks
# ---------------------------------------------------------------------------------------------------

def _check_splits(splits: str | Iterable[str]) -> list[str]:
    splits = [splits] if isinstance(splits, str) else list(splits)
    for s in splits:
        if s not in SPLITS:
            raise DataError(None, f"unknown split {s!r}: expected some of {', '.join(SPLITS)}")
    return splits


def _check_root(root: str | os.PathLike, dataset: str, layouts: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(root, f"{dataset} folder not found; expected it to hold {layouts}")
    return root


def _read_labels_json(path: Path) -> list[str]:
    """A torchmeta ``{split}_labels.json``: a non-empty list of distinct class names."""
    try:
        names = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "file not found (the class-name list of the HDF5 beside it)") from None
    except (OSError, ValueError) as exc:
        raise DataError(path, f"expected a JSON list of class names ({type(exc).__name__}: {exc})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(path, "expected a non-empty JSON list of class-name strings")
    if len(set(names)) != len(names):
        raise DataError(path, "expected distinct class names, found duplicates")
    return names


class _H5:
    """``h5py.File`` opened read-only, with h5py's errors (truncated file, not HDF5) as DataError."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import h5py

        try:
            self.file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise DataError(self.path, "file not found") from None
        except OSError as exc:
            raise DataError(self.path, f"not a readable HDF5 file, truncated or corrupt ({exc})") from None
        return self.file

    def __exit__(self, *exc):
        self.file.close()


def _h5_class_datasets(f, h5_path: Path, json_path: Path, names: list[str]) -> list:
    """The datasets ``datasets/<name>`` for every name of the label file."""
    import h5py

    group = f.get("datasets")
    if not isinstance(group, h5py.Group):
        raise DataError(h5_path, "expected a group named 'datasets' holding one dataset per class")
    missing = [n for n in names if not isinstance(group.get(n), h5py.Dataset)]
    if missing:
        raise DataError(json_path, f"lists {len(missing)} class(es) that {h5_path.name} lacks under "
                                   f"'datasets', e.g. {missing[0]!r}: the label file does not match the data")
    return [group[n] for n in names]


def _h5_read(h5_path: Path, fn):
    """Run ``fn()`` that reads an open HDF5 file, turning read errors into DataError."""
    try:
        return fn()
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(h5_path, f"cannot read the data, truncated or corrupt ({exc})") from None


def _check_nonempty(path: Path, names: list[str], counts: list[int]) -> None:
    for name, n in zip(names, counts):
        if n == 0:
            raise DataError(path, f"class {name!r} has no images")


def _check_image_array(path: Path, what: str, arr: object, dtypes=(np.uint8,)) -> None:
    shape = getattr(arr, "shape", None)
    dtype = getattr(arr, "dtype", None)
    if shape is None or len(shape) != 4 or tuple(shape[1:]) != _SHAPE or dtype not in dtypes:
        expected = " or ".join(np.dtype(d).name for d in dtypes)
        raise DataError(path, f"{what}: expected {expected} (N, 84, 84, 3) images, found "
                              f"{np.dtype(dtype).name if dtype is not None else type(arr).__name__} {shape}")


def _check_vlen_bytes(h5_path: Path, name: str, ds) -> int:
    import h5py

    if ds.ndim != 1 or h5py.check_vlen_dtype(ds.dtype) != np.dtype(np.uint8):
        raise DataError(h5_path, f"dataset 'datasets/{name}': expected a 1-D dataset of variable-length "
                                 f"uint8 (encoded image bytes), found {ds.dtype} {ds.shape}")
    return int(ds.shape[0])


# ---------------------------------------------------------------------------------------------------
# Layout readers. Each `_plan_*` validates what it can cheaply and returns `build(progress, cache_dir)`.
# ---------------------------------------------------------------------------------------------------

Build = Callable[..., ImageSplit]  # build(progress, cache_dir)


def _plan_uint8_hdf5(h5_path: Path, json_path: Path, float_ok: bool) -> Build:
    """torchmeta mini-ImageNet / SiMT Cars: one ``(n, 84, 84, 3)`` dataset per class."""
    names = _read_labels_json(json_path)
    dtypes = (np.uint8, np.float32, np.float64) if float_ok else (np.uint8,)
    with _H5(h5_path) as f:
        datasets = _h5_class_datasets(f, h5_path, json_path, names)
        for name, ds in zip(names, datasets):
            _check_image_array(h5_path, f"dataset 'datasets/{name}'", ds, dtypes)
        counts = [int(ds.shape[0]) for ds in datasets]
    _check_nonempty(h5_path, names, counts)

    def build(progress: bool, cache_dir) -> ImageSplit:
        offsets = _offsets(counts)
        images = np.empty((int(offsets[-1]), *_SHAPE), dtype=np.uint8)

        def read():
            with _H5(h5_path) as f:
                for k, name in enumerate(names):
                    ds = f["datasets"][name]
                    if ds.dtype == np.uint8:
                        ds.read_direct(images[offsets[k]:offsets[k + 1]])
                        continue
                    # SiMT's Cars file stores 0..255 as float32; the official loader casts with
                    # .astype(np.uint8), which we match after checking the range.
                    block = ds[()]
                    if not np.all(np.isfinite(block)) or block.min() < 0 or block.max() > 255:
                        raise DataError(h5_path, f"dataset 'datasets/{name}': expected pixel values in "
                                                 f"0..255, found {np.nanmin(block)}..{np.nanmax(block)}")
                    images[offsets[k]:offsets[k + 1]] = block.astype(np.uint8)

        _h5_read(h5_path, read)
        return ImageSplit(images, offsets, names)

    return build


def _plan_encoded_hdf5(dataset: str, split: str, h5_path: Path, json_path: Path, transform: str) -> Build:
    """torchmeta tiered-ImageNet (PNG) / CUB (JPEG): one 1-D vlen-uint8 dataset per class."""
    names = _read_labels_json(json_path)
    with _H5(h5_path) as f:
        datasets = _h5_class_datasets(f, h5_path, json_path, names)
        counts = [_check_vlen_bytes(h5_path, n, ds) for n, ds in zip(names, datasets)]
    _check_nonempty(h5_path, names, counts)

    def items() -> Iterator[tuple[object, str]]:
        with _H5(h5_path) as f:
            for name in names:
                # One read per class: per-element reads of vlen data are slow in h5py.
                blobs = _h5_read(h5_path, lambda: f["datasets"][name][()])
                for j, blob in enumerate(blobs):
                    yield blob, f"{h5_path} (class {name!r}, image {j})"

    plan = _EncodedPlan(dataset, split, "torchmeta-hdf5", transform, [_stamp(h5_path), _stamp(json_path)],
                        names, counts, items)
    return lambda progress, cache_dir: _materialize(plan, cache_dir, progress)


def _labels_order(path: Path, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class ids (sorted), counts per class and the stable permutation grouping images by class."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(path, f"expected a 1-D list of integer labels, found {labels.dtype} {labels.shape}")
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(labels, kind="stable")
    return ids, counts, order


def _tiered_labels(path: Path, n_images: int | None) -> tuple[list[str], list[int], np.ndarray]:
    """Read a tiered-ImageNet ``{split}_labels.pkl``: class names, counts and grouping permutation.

    Ren et al.'s file has ``label_specific`` (int per image) and ``label_specific_str`` (names);
    MetaOptNet's has ``labels`` (int per image, offset per split; no names: the ids become names).
    """
    data = _str_keys(safe_load_pickle(path))
    if not isinstance(data, dict):
        raise DataError(path, f"expected a dict of labels, found {type(data).__name__}")
    if "label_specific" in data:
        labels, names_src = np.asarray(data["label_specific"]), data.get("label_specific_str")
    elif "labels" in data:
        labels, names_src = np.asarray(data["labels"]), None
    else:
        raise DataError(path, f"expected key 'label_specific' (Ren et al.) or 'labels' (MetaOptNet), "
                              f"found {sorted(map(str, data))}")
    ids, counts, order = _labels_order(path, labels)
    if n_images is not None and len(labels) != n_images:
        raise DataError(path, f"has {len(labels)} labels but the images file has {n_images} images: "
                              "the label file does not match the data")
    if names_src is not None:
        names_src = [_as_str(n) for n in names_src]
        if ids[0] < 0 or ids[-1] >= len(names_src):
            raise DataError(path, f"label ids {ids[0]}..{ids[-1]} do not index the "
                                  f"{len(names_src)} names of 'label_specific_str'")
        names = [names_src[i] for i in ids]
    else:
        names = [str(i) for i in ids]
    return names, counts.tolist(), order


def _npz_member(path: Path) -> tuple[zipfile.ZipFile, str]:
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(path, f"not a readable .npz (zip) file, truncated or corrupt ({exc})") from None
    if "images.npy" not in zf.namelist():
        zf.close()
        raise DataError(path, f"expected an array named 'images', found {[n[:-4] for n in zf.namelist()]}")
    return zf, "images.npy"


def _npz_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of ``images`` in an ``.npz``, read without loading the data."""
    zf, member = _npz_member(path)
    try:
        with zf, zf.open(member) as fp:
            version = np.lib.format.read_magic(fp)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = reader(fp)
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(path, f"cannot read array 'images', truncated or corrupt ({exc})") from None
    return shape, dtype


def _npz_images(path: Path) -> np.ndarray:
    zf, member = _npz_member(path)
    try:
        with zf, zf.open(member) as fp:
            return np.lib.format.read_array(fp, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(path, f"cannot read array 'images', truncated or corrupt ({exc})") from None


def _plan_tiered_npz(npz_path: Path, pkl_path: Path, bgr: bool) -> Build:
    """MetaOptNet/FEAT ``{split}_images.npz`` + ``{split}_labels.pkl`` (images already decoded)."""
    if not pkl_path.is_file():
        raise DataError(pkl_path, f"file not found (the labels of {npz_path.name})")
    shape, dtype = _npz_header(npz_path)
    _check_image_array(npz_path, "array 'images'", SimpleNamespace(shape=shape, dtype=dtype))
    names, counts, order = _tiered_labels(pkl_path, shape[0])

    def build(progress: bool, cache_dir) -> ImageSplit:
        images = _npz_images(npz_path)
        if np.any(order != np.arange(len(order))):
            images = images[order]  # group by class (the usual files are grouped already)
        if bgr:
            # In place, a block at a time, so a 9 GB split does not need a second copy.
            for i in range(0, len(images), 4096):
                images[i:i + 4096] = images[i:i + 4096, :, :, ::-1].copy()
        return ImageSplit(images, _offsets(counts), names)

    return build


def _plan_tiered_png_pkl(split: str, png_path: Path, pkl_path: Path) -> Build:
    """Ren et al.'s ``{split}_images_png.pkl`` (list of PNG byte arrays) + ``{split}_labels.pkl``."""
    if not pkl_path.is_file():
        raise DataError(pkl_path, f"file not found (the labels of {png_path.name})")
    names, counts, order = _tiered_labels(pkl_path, None)

    blobs: list = []

    def prepare() -> None:
        loaded = safe_load_pickle(png_path)
        if not isinstance(loaded, list) or len(loaded) != len(order):
            found = f"{len(loaded)} items" if isinstance(loaded, list) else type(loaded).__name__
            raise DataError(png_path, f"expected a list of {len(order)} PNG byte arrays (one per label "
                                      f"in {pkl_path.name}), found {found}")
        blobs[:] = loaded

    def items() -> Iterator[tuple[object, str]]:
        for i in order:
            yield blobs[i], f"{png_path} (image {i})"

    plan = _EncodedPlan("tieredimagenet", split, "ren-png-pkl", "resize84", [_stamp(png_path), _stamp(pkl_path)],
                        names, counts, items, prepare)
    return lambda progress, cache_dir: _materialize(plan, cache_dir, progress)


def _plan_mini_pickle(path: Path) -> Build:
    """Ren et al. / learn2learn ``mini-imagenet-cache-{split}.pkl`` (images already decoded, RGB)."""

    def build(progress: bool, cache_dir) -> ImageSplit:
        data = _str_keys(safe_load_pickle(path))
        if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
            found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise DataError(path, f"expected a dict with keys 'image_data' and 'class_dict', found {found}")
        images, class_dict = data["image_data"], _str_keys(data["class_dict"])
        _check_image_array(path, "'image_data'", images)
        if not isinstance(class_dict, dict) or not class_dict:
            raise DataError(path, "expected 'class_dict' to map class names to lists of image indices")
        # Sorted names, as torchmeta orders its labels JSON when it converts this very file.
        names = sorted(_as_str(k) for k in class_dict)
        by_name = {_as_str(k): v for k, v in class_dict.items()}
        try:
            index_lists = [np.asarray(by_name[n], dtype=np.int64).reshape(-1) for n in names]
        except (TypeError, ValueError):
            raise DataError(path, "expected 'class_dict' values to be lists of integer image indices") from None
        counts = [len(ix) for ix in index_lists]
        _check_nonempty(path, names, counts)
        order = np.concatenate(index_lists)
        n = len(images)
        if order.min() < 0 or order.max() >= n or len(np.unique(order)) != len(order) or len(order) != n:
            raise DataError(path, f"'class_dict' must list each of the {n} images of 'image_data' exactly "
                                  f"once; it lists {len(order)} indices in {order.min()}..{order.max()}: "
                                  "the labels do not match the data")
        if np.any(order != np.arange(n)):
            images = images[order]
        return ImageSplit(np.ascontiguousarray(images), _offsets(counts), names)

    return build


def _plan_mini_csv(split: str, csv_path: Path, images_dir: Path) -> Build:
    """Ravi & Larochelle ``{split}.csv`` (``filename,label``) + ``images/`` (JPEG files)."""
    if not images_dir.is_dir():
        raise DataError(images_dir, f"folder not found (the images listed in {csv_path.name})")
    try:
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(csv_path, f"cannot read the CSV ({exc})") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        found = repr(",".join(rows[0])) if rows else "an empty file"
        raise DataError(csv_path, f"expected the header 'filename,label', found {found}")
    by_class: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise DataError(csv_path, f"line {line}: expected 2 fields 'filename,label', found {len(row)}")
        by_class.setdefault(row[1].strip(), []).append(row[0].strip())
    if not by_class:
        raise DataError(csv_path, "lists no images")
    names = sorted(by_class)  # as the Ren et al. pickle (class_dict) is read: sorted names
    files = [images_dir / fn for n in names for fn in by_class[n]]
    # Check every file before decoding anything, and key the cache by all of them.
    h = hashlib.sha256()
    for p in files:
        try:
            st = p.stat()
        except OSError:
            raise DataError(p, f"image listed in {csv_path.name} not found") from None
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    sources = [_stamp(csv_path), {"path": str(images_dir.resolve()), "files": len(files),
                                  "digest": h.hexdigest()}]

    def items() -> Iterator[tuple[object, str]]:
        for p in files:
            try:
                yield p.read_bytes(), str(p)
            except OSError as exc:
                raise DataError(p, f"cannot read the image ({exc})") from None

    plan = _EncodedPlan("miniimagenet", split, "ravi-csv", "resize84", sources, names,
                        [len(by_class[n]) for n in names], items)
    return lambda progress, cache_dir: _materialize(plan, cache_dir, progress)


# ---------------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------------

_MINI_LAYOUTS = ("{s}_data.hdf5 + {s}_labels.json (torchmeta), mini-imagenet-cache-{s}.pkl (Ren et al. / "
                 "learn2learn), or {s}.csv + images/ (Ravi & Larochelle)")
_TIERED_LAYOUTS = ("{s}_data.hdf5 + {s}_labels.json (torchmeta), {s}_images.npz + {s}_labels.pkl "
                   "(MetaOptNet / FEAT), or {s}_images_png.pkl + {s}_labels.pkl (Ren et al.)")
_CUB_LAYOUTS = "{s}_data.hdf5 (JPEG bytes per class) + {s}_labels.json (torchmeta)"
_CARS_LAYOUTS = "{s}_data.hdf5 ((n, 84, 84, 3) per class) + {s}_labels.json (as SiMT's data/cars.py reads)"


def _missing_split(root: Path, dataset: str, split: str, layouts: str) -> DataError:
    return DataError(root, f"no {dataset} '{split}' split: looked for {layouts.format(s=split)}")


def _mini_plan(root: Path, split: str) -> Build:
    h5, js = root / f"{split}_data.hdf5", root / f"{split}_labels.json"
    if h5.is_file() or js.is_file():
        if not h5.is_file():
            raise DataError(h5, f"file not found (the torchmeta data beside {js.name})")
        return _plan_uint8_hdf5(h5, js, float_ok=False)
    names = [f"mini-imagenet-cache-{split}.pkl"] + (["mini-imagenet-cache-validation.pkl"] if split == "val" else [])
    for name in names:
        if (root / name).is_file():
            return _plan_mini_pickle(root / name)
    if (root / f"{split}.csv").is_file():
        return _plan_mini_csv(split, root / f"{split}.csv", root / "images")
    raise _missing_split(root, "mini-ImageNet", split, _MINI_LAYOUTS)


def _tiered_plan(root: Path, split: str, bgr: bool) -> Build:
    h5, js = root / f"{split}_data.hdf5", root / f"{split}_labels.json"
    if h5.is_file() or js.is_file():
        if not h5.is_file():
            raise DataError(h5, f"file not found (the torchmeta data beside {js.name})")
        return _plan_encoded_hdf5("tieredimagenet", split, h5, js, "resize84")
    npz, pkl, png = root / f"{split}_images.npz", root / f"{split}_labels.pkl", root / f"{split}_images_png.pkl"
    if npz.is_file():
        return _plan_tiered_npz(npz, pkl, bgr)
    if png.is_file():
        return _plan_tiered_png_pkl(split, png, pkl)
    raise _missing_split(root, "tiered-ImageNet", split, _TIERED_LAYOUTS)


def _hdf5_json_paths(root: Path, dataset: str, split: str, layouts: str) -> tuple[Path, Path]:
    h5, js = root / f"{split}_data.hdf5", root / f"{split}_labels.json"
    if not h5.is_file() and not js.is_file():
        raise _missing_split(root, dataset, split, layouts)
    if not h5.is_file():
        raise DataError(h5, f"file not found (the data of {js.name})")
    return h5, js


def _load(dataset: str, root, splits, progress: bool, cache_dir, layouts: str,
          plan: Callable[[Path, str], Build]) -> dict[str, ImageSplit]:
    root = _check_root(root, dataset, layouts.format(s="<split>"))
    # Validate every split (files, keys, shapes, labels) before decoding any of them.
    builds = {split: plan(root, split) for split in _check_splits(splits)}
    out = {split: build(progress, cache_dir) for split, build in builds.items()}
    log.info("%s", describe(out, dataset))
    return out


def load_miniimagenet(root: str | os.PathLike, splits: str | Iterable[str] = SPLITS, progress: bool = True,
                      *, cache_dir: str | os.PathLike | None = None) -> dict[str, ImageSplit]:
    """mini-ImageNet from ``root`` (the ``miniimagenet/`` folder), any of the layouts in the module doc.

    Returns ``{split: ImageSplit}`` with images uint8 (N, 84, 84, 3) RGB, classes in sorted-name order
    (the order of torchmeta's labels JSON). Only the Ravi CSV layout needs decoding (cached).
    """
    return _load("miniimagenet", root, splits, progress, cache_dir, _MINI_LAYOUTS, _mini_plan)


def load_tieredimagenet(root: str | os.PathLike, splits: str | Iterable[str] = SPLITS, progress: bool = True,
                        *, cache_dir: str | os.PathLike | None = None, npz_bgr: bool = True
                        ) -> dict[str, ImageSplit]:
    """tiered-ImageNet from ``root`` (the ``tieredimagenet/`` folder).

    Classes follow the labels JSON (torchmeta) or the label ids (npz/pkl layouts). ``npz_bgr``: the
    ``.npz`` images are BGR (made with OpenCV) and flipped to RGB; pass False for an RGB ``.npz``.
    The PNG layouts are decoded once and cached.
    """
    return _load("tieredimagenet", root, splits, progress, cache_dir, _TIERED_LAYOUTS,
                 lambda r, s: _tiered_plan(r, s, npz_bgr))


def load_cub(root: str | os.PathLike, splits: str | Iterable[str] = SPLITS, progress: bool = True,
             *, cache_dir: str | os.PathLike | None = None) -> dict[str, ImageSplit]:
    """CUB-200-2011 from ``root`` (the ``cub/`` folder, torchmeta layout), decoded as the official code:
    shorter side to 126, centre 84x84 crop. Decoded once and cached."""

    def plan(r: Path, s: str) -> Build:
        h5, js = _hdf5_json_paths(r, "CUB", s, _CUB_LAYOUTS)
        return _plan_encoded_hdf5("cub", s, h5, js, "cub")

    return _load("cub", root, splits, progress, cache_dir, _CUB_LAYOUTS, plan)


def load_cars(root: str | os.PathLike, splits: str | Iterable[str] = SPLITS, progress: bool = True,
              *, cache_dir: str | os.PathLike | None = None) -> dict[str, ImageSplit]:
    """Stanford Cars from ``root`` (the ``cars/`` folder) in the HDF5 layout of SiMT's ``data/cars.py``:
    84x84 crops stored as arrays (float32 0..255 or uint8), cast to uint8 as the official loader does."""

    def plan(r: Path, s: str) -> Build:
        h5, js = _hdf5_json_paths(r, "Cars", s, _CARS_LAYOUTS)
        return _plan_uint8_hdf5(h5, js, float_ok=True)

    return _load("cars", root, splits, progress, cache_dir, _CARS_LAYOUTS, plan)


LOADERS: dict[str, Callable[..., dict[str, ImageSplit]]] = {
    "miniimagenet": load_miniimagenet,
    "tieredimagenet": load_tieredimagenet,
    "cub": load_cub,
    "cars": load_cars,
}


def describe(data: dict[str, ImageSplit], dataset: str | None = None) -> str:
    """One line of class and image counts per split, noting counts that differ from the paper's."""
    expected = EXPECTED_CLASSES.get(dataset or "") or {}
    parts = []
    for split, s in data.items():
        part = f"{split} {s.num_classes} classes / {len(s.images)} images"
        if split in expected and expected[split] != s.num_classes:
            part += f" (standard split: {expected[split]} classes)"
        parts.append(part)
    return f"{dataset or 'images'}: " + ", ".join(parts)


def image_dataset(name: str, root: str | os.PathLike, splits: Sequence[str] = SPLITS) -> "FewShotDataset":
    """`dataset=miniimagenet|tieredimagenet` (and `eval_dataset=cub|cars`) as a FewShotDataset.

    The (N, 84, 84, 3) arrays (possibly memory-mapped caches) become (N, 3, 84, 84) views: no copy.
    """
    from simt.data import ClassSplit, FewShotDataset

    if name not in LOADERS:
        raise DataError(None, f"dataset {name!r}: expected one of {', '.join(LOADERS)}")
    loaded = LOADERS[name](Path(root), splits=list(splits), progress=sys.stderr.isatty())
    with warnings.catch_warnings():  # read-only memmaps: torch warns, but we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return FewShotDataset({split: ClassSplit(torch.from_numpy(data.images).permute(0, 3, 1, 2),
                                                 torch.from_numpy(data.offsets))
                               for split, data in loaded.items()}, name)
