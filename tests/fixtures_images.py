"""Writers of tiny, format-exact classification data files, one per layout the image loaders accept.

Each writer creates ``<data_dir>/<dataset>/...`` exactly as the real files are laid out (names, keys,
dtypes, shapes, encodings), with a few classes of a few images. Class ``k`` of a data set (counted
across splits: train first, then val, then test) is a solid colour :func:`class_colour` plus a little
noise, so a loader's class grouping and colour order can be checked from image means. Every colour
has red far above blue, so a BGR/RGB swap is visible.

Used by the loader tests and by end-to-end runs (``python run.py dataset=miniimagenet
data_dir=<data_dir>``, see :func:`write_all`).
"""
from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
DEFAULT_CLASSES = {"train": 3, "val": 2, "test": 2}
NOISE = 8  # +-NOISE uniform per pixel around the class colour


def _classes(classes_per_split: int | dict[str, int] | None) -> dict[str, int]:
    if classes_per_split is None:
        return dict(DEFAULT_CLASSES)
    if isinstance(classes_per_split, int):
        return {s: classes_per_split for s in SPLITS}
    return {s: int(classes_per_split[s]) for s in SPLITS if s in classes_per_split}


def _first_index(counts: dict[str, int], split: str) -> int:
    """Global index of the split's first class (train, then val, then test)."""
    return sum(counts.get(s, 0) for s in SPLITS[:SPLITS.index(split)])


def class_colour(k: int) -> tuple[int, int, int]:
    """RGB colour of global class ``k``: 24 distinct colours (then repeating), red >= blue + 120."""
    g = 20 + 40 * (k % 6)
    r = 230 if (k // 6) % 2 == 0 else 190
    b = 30 if (k // 12) % 2 == 0 else 70
    return r, g, b


def class_images(k: int, n: int, size: tuple[int, int] = (84, 84), seed: int = 0) -> np.ndarray:
    """uint8 ``(n, h, w, 3)`` RGB: ``class_colour(k)`` plus uniform noise; ``size`` is (h, w)."""
    rng = np.random.default_rng([seed, k])
    base = np.asarray(class_colour(k), dtype=np.int16)
    noise = rng.integers(-NOISE, NOISE + 1, size=(n, *size, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """PNG or JPEG bytes of one uint8 (h, w, 3) RGB image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """uint8 (h, w, 3) RGB, decoded with PIL the way the loaders do."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _interleave(counts: list[int]) -> list[tuple[int, int]]:
    """(class, image) pairs round-robin across classes: files whose images are not grouped by class."""
    pairs, j = [], 0
    while len(pairs) < sum(counts):
        pairs += [(c, j) for c, n in enumerate(counts) if j < n]
        j += 1
    return pairs


def _write_labels_json(path: Path, names: list[str]) -> None:
    path.write_text(json.dumps(names))


# ---------------------------------------------------------------------------------------------------
# mini-ImageNet
# ---------------------------------------------------------------------------------------------------

def mini_class_name(k: int) -> str:
    """A WordNet-id-like name, as mini-ImageNet's (e.g. ``n01532829``)."""
    return f"n{1000000 + 7919 * k:08d}"


def miniimagenet_content(classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> dict:
    """What every mini-ImageNet writer stores, per split: ``names`` (sorted), ``jpegs`` (list per class
    of JPEG bytes, the Ravi files) and ``images`` uint8 (N, 84, 84, 3), those JPEGs decoded, grouped by
    class in ``names`` order (what the HDF5 and pickle layouts hold, so all three layouts agree)."""
    counts = _classes(classes_per_split)
    out = {}
    for split, n_classes in counts.items():
        first = _first_index(counts, split)
        names = [mini_class_name(first + c) for c in range(n_classes)]
        order = sorted(range(n_classes), key=lambda c: names[c])
        jpegs = [[encode(im, "JPEG") for im in class_images(first + c, images_per_class, seed=seed)]
                 for c in order]
        images = np.stack([decode(b) for per_class in jpegs for b in per_class])
        out[split] = {"names": [names[c] for c in order], "jpegs": jpegs, "images": images,
                      "offsets": np.arange(n_classes + 1, dtype=np.int64) * images_per_class,
                      "colour_index": [first + c for c in order]}
    return out


def write_miniimagenet_hdf5(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> Path:
    """torchmeta: ``{split}_data.hdf5`` (group ``datasets``, one uint8 (n, 84, 84, 3) dataset per class)
    + ``{split}_labels.json`` (sorted class names)."""
    root = Path(data_dir) / "miniimagenet"
    root.mkdir(parents=True, exist_ok=True)
    for split, c in miniimagenet_content(classes_per_split, images_per_class, seed).items():
        with h5py.File(root / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for k, name in enumerate(c["names"]):
                group.create_dataset(name, data=c["images"][c["offsets"][k]:c["offsets"][k + 1]])
        _write_labels_json(root / f"{split}_labels.json", c["names"])
    return root


def _mini_pickle_dict(c: dict) -> tuple[np.ndarray, dict[str, list[int]]]:
    """``image_data`` with the classes interleaved and the ``class_dict`` that indexes it."""
    counts = np.diff(c["offsets"]).tolist()
    pairs = _interleave(counts)
    image_data = np.stack([c["images"][c["offsets"][k] + j] for k, j in pairs])
    class_dict: dict[str, list[int]] = {name: [] for name in reversed(c["names"])}  # unsorted keys
    for i, (k, _) in enumerate(pairs):
        class_dict[c["names"][k]].append(i)
    return image_data, class_dict


def write_miniimagenet_pickle(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0,
                              py2: bool = False, val_name: str = "val") -> Path:
    """Ren et al. / learn2learn: ``mini-imagenet-cache-{split}.pkl``, a dict ``{"image_data": uint8
    (N, 84, 84, 3) RGB, "class_dict": {name: [indices]}}``. ``py2`` writes it as Python 2 pickled it
    (protocol 2, byte strings, ``numpy.core`` names); ``val_name="validation"`` as learn2learn names it."""
    root = Path(data_dir) / "miniimagenet"
    root.mkdir(parents=True, exist_ok=True)
    for split, c in miniimagenet_content(classes_per_split, images_per_class, seed).items():
        image_data, class_dict = _mini_pickle_dict(c)
        obj = {"image_data": image_data, "class_dict": class_dict}
        name = val_name if split == "val" else split
        payload = py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        (root / f"mini-imagenet-cache-{name}.pkl").write_bytes(payload)
    return root


def write_miniimagenet_csv(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> Path:
    """Ravi & Larochelle: ``{split}.csv`` (header ``filename,label``) + ``images/<name><8 digits>.jpg``."""
    root = Path(data_dir) / "miniimagenet"
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, c in miniimagenet_content(classes_per_split, images_per_class, seed).items():
        counts = np.diff(c["offsets"]).tolist()
        rows = ["filename,label"]
        for k, j in _interleave(counts):
            fn = f"{c['names'][k]}{j + 1:08d}.jpg"
            (root / "images" / fn).write_bytes(c["jpegs"][k][j])
            rows.append(f"{fn},{c['names'][k]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------
# A Python-2-style pickler (protocol 2, str = bytes, numpy.core names), for the py2-era pickles
# ---------------------------------------------------------------------------------------------------

def _p2_str(s: str | bytes) -> bytes:
    b = s.encode("latin1") if isinstance(s, str) else s
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _p2(obj) -> bytes:
    if obj is None:
        return b"N"
    if obj is True or obj is False:
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, (int, np.integer)):
        return b"J" + struct.pack("<i", int(obj))
    if isinstance(obj, (str, bytes)):
        return _p2_str(obj)
    if isinstance(obj, tuple):
        return b"(" + b"".join(_p2(x) for x in obj) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(_p2(x) for x in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_p2(k) + _p2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        kind = arr.dtype.str  # e.g. '|u1', '<i8'
        dtype = (b"cnumpy\ndtype\n" + _p2((kind[1:], 0, 1)) + b"R"
                 + _p2((3, kind[0], None, None, None, -1, -1, 0)) + b"b")
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"(cnumpy\nndarray\n" + _p2((0,)) + _p2("b") + b"tR"
                + b"(" + _p2(1) + _p2(tuple(arr.shape)) + dtype + _p2(False) + _p2(arr.tobytes()) + b"tb")
    raise TypeError(f"py2_pickle: unsupported {type(obj).__name__}")


def py2_pickle(obj) -> bytes:
    """Bytes of ``obj`` (dicts, lists, tuples, ints, strings, numpy arrays) as Python 2's pickle wrote
    them at protocol 2: strings as byte strings, arrays via ``numpy.core.multiarray._reconstruct``."""
    return b"\x80\x02" + _p2(obj) + b"."


# ---------------------------------------------------------------------------------------------------
# tiered-ImageNet
# ---------------------------------------------------------------------------------------------------

def tiered_content(classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> dict:
    """Per split: ``names`` (specific class names, label-id order), ``general`` (category per class),
    ``images`` uint8 (N, 84, 84, 3) RGB grouped by class, ``offsets``, ``colour_index``."""
    counts = _classes(classes_per_split)
    out = {}
    for split, n_classes in counts.items():
        first = _first_index(counts, split)
        out[split] = {
            "names": [f"tiered class {first + c}" for c in range(n_classes)],
            "general": [f"category {(first + c) // 2}" for c in range(n_classes)],
            "images": np.concatenate([class_images(first + c, images_per_class, seed=seed)
                                      for c in range(n_classes)]),
            "offsets": np.arange(n_classes + 1, dtype=np.int64) * images_per_class,
            "colour_index": [first + c for c in range(n_classes)],
            "first": first,
        }
    return out


def write_tiered_hdf5(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> Path:
    """torchmeta: ``{split}_data.hdf5``, group ``datasets``, per class a 1-D variable-length uint8
    dataset of PNG bytes with attrs ``label_general``/``label_specific``; ``{split}_labels.json``."""
    root = Path(data_dir) / "tieredimagenet"
    root.mkdir(parents=True, exist_ok=True)
    vlen = h5py.special_dtype(vlen=np.dtype(np.uint8))
    for split, c in tiered_content(classes_per_split, images_per_class, seed).items():
        with h5py.File(root / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for k, name in enumerate(c["names"]):
                block = c["images"][c["offsets"][k]:c["offsets"][k + 1]]
                ds = group.create_dataset(name, (len(block),), dtype=vlen)
                ds.attrs["label_general"] = c["general"][k]
                ds.attrs["label_specific"] = name
                for j, im in enumerate(block):
                    ds[j] = np.frombuffer(encode(im, "PNG"), dtype=np.uint8)
        _write_labels_json(root / f"{split}_labels.json", c["names"])
    return root


def _tiered_labels_pkl(c: dict, pairs: list[tuple[int, int]], labels_format: str) -> dict:
    specific = np.asarray([k for k, _ in pairs], dtype=np.int32)
    if labels_format == "metaoptnet":
        # MetaOptNet's files: a list of ints per image, offset per split so splits do not overlap.
        return {"labels": [int(c["first"] + k) for k in specific]}
    general_str = sorted(set(c["general"]), key=c["general"].index)
    return {"label_specific": specific,
            "label_general": np.asarray([general_str.index(c["general"][k]) for k in specific], dtype=np.int32),
            "label_specific_str": list(c["names"]), "label_general_str": general_str}


def write_tiered_npz(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0,
                     labels_format: str = "ren") -> Path:
    """MetaOptNet / FEAT: ``{split}_images.npz`` (``images`` uint8 (N, 84, 84, 3) in **BGR**, as OpenCV
    made them; classes interleaved here) + ``{split}_labels.pkl`` (``labels_format`` "ren": keys
    ``label_specific``, ``label_general``, ``label_specific_str``, ``label_general_str``;
    "metaoptnet": key ``labels``)."""
    root = Path(data_dir) / "tieredimagenet"
    root.mkdir(parents=True, exist_ok=True)
    for split, c in tiered_content(classes_per_split, images_per_class, seed).items():
        pairs = _interleave(np.diff(c["offsets"]).tolist())
        rgb = np.stack([c["images"][c["offsets"][k] + j] for k, j in pairs])
        np.savez(root / f"{split}_images.npz", images=np.ascontiguousarray(rgb[..., ::-1]))
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(_tiered_labels_pkl(c, pairs, labels_format), f, protocol=2)
    return root


def write_tiered_png_pkl(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> Path:
    """Ren et al.'s archive: ``{split}_images_png.pkl`` (a list of uint8 (bytes, 1) arrays of PNG data,
    as ``cv2.imencode`` returns them) + ``{split}_labels.pkl`` (Ren's keys)."""
    root = Path(data_dir) / "tieredimagenet"
    root.mkdir(parents=True, exist_ok=True)
    for split, c in tiered_content(classes_per_split, images_per_class, seed).items():
        pairs = _interleave(np.diff(c["offsets"]).tolist())
        pngs = [np.frombuffer(encode(c["images"][c["offsets"][k] + j], "PNG"), dtype=np.uint8).reshape(-1, 1)
                for k, j in pairs]
        with open(root / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(pngs, f, protocol=pickle.HIGHEST_PROTOCOL)
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(_tiered_labels_pkl(c, pairs, "ren"), f, protocol=2)
    return root


# ---------------------------------------------------------------------------------------------------
# CUB and Cars
# ---------------------------------------------------------------------------------------------------

CUB_SIZES = [(150, 100), (100, 180), (126, 126), (97, 131), (200, 140)]  # (h, w) cycled per image


def write_cub_hdf5(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> Path:
    """torchmeta CUB: ``{split}_data.hdf5``, group ``datasets``, per class a 1-D variable-length uint8
    dataset of JPEG bytes (images of varied sizes, like the real photos); ``{split}_labels.json``."""
    root = Path(data_dir) / "cub"
    root.mkdir(parents=True, exist_ok=True)
    counts = _classes(classes_per_split)
    vlen = h5py.special_dtype(vlen=np.dtype(np.uint8))
    for split, n_classes in counts.items():
        first = _first_index(counts, split)
        names = [f"{first + c + 1:03d}.Bird_species_{first + c}" for c in range(n_classes)]
        with h5py.File(root / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for c, name in enumerate(names):
                ds = group.create_dataset(name, (images_per_class,), dtype=vlen)
                for j in range(images_per_class):
                    size = CUB_SIZES[(c + j) % len(CUB_SIZES)]
                    im = class_images(first + c, 1, size=size, seed=seed + j)[0]
                    ds[j] = np.frombuffer(encode(im, "JPEG"), dtype=np.uint8)
        _write_labels_json(root / f"{split}_labels.json", names)
    return root


def write_cars_hdf5(data_dir, classes_per_split=None, images_per_class: int = 4, seed: int = 0) -> Path:
    """SiMT's Cars layout: ``{split}_data.hdf5``, group ``datasets``, per class a (n, 84, 84, 3) float32
    dataset holding 0..255 (the converter that made these files, BOIL's ``torchmeta/datasets/cars.py``,
    calls ``create_dataset(label, (n, 84, 84, 3))`` without a dtype: h5py's default 'f4');
    ``{split}_labels.json``."""
    root = Path(data_dir) / "cars"
    root.mkdir(parents=True, exist_ok=True)
    counts = _classes(classes_per_split)
    for split, n_classes in counts.items():
        first = _first_index(counts, split)
        names = [f"Car Make {first + c} Model 2012" for c in range(n_classes)]
        with h5py.File(root / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for c, name in enumerate(names):
                # Explicit 'f4': what h5py's default gave the real files (newer h5py warns without it).
                ds = group.create_dataset(name, (images_per_class, 84, 84, 3), dtype="f4")
                ds[...] = class_images(first + c, images_per_class, seed=seed)
        _write_labels_json(root / f"{split}_labels.json", names)
    return root


def write_all(data_dir, classes_per_split=None, images_per_class: int = 20, seed: int = 0) -> Path:
    """Fixtures for end-to-end runs: mini-ImageNet (torchmeta HDF5), tiered-ImageNet (torchmeta HDF5),
    CUB and Cars under ``data_dir``. Defaults allow 5-way tasks with up to 20 images per class."""
    classes = classes_per_split or {"train": 6, "val": 5, "test": 5}
    write_miniimagenet_hdf5(data_dir, classes, images_per_class, seed)
    write_tiered_hdf5(data_dir, classes, images_per_class, seed)
    write_cub_hdf5(data_dir, classes, images_per_class, seed)
    write_cars_hdf5(data_dir, classes, images_per_class, seed)
    return Path(data_dir)
