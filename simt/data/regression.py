"""Few-shot regression data: the paper's ShapeNet1D and Pascal1D pickles, and the embedded ``kanji_pose``.

A regression data set is one :class:`RegressionSplit` per split. Every *object* is one task: the
task sampler draws one object, then disjoint support and query samples of it. The samples of an
object are contiguous rows of one in-memory uint8 image array, so sampling a task is pure indexing.

**ShapeNet1D** (folder ``ShapeNet1D/``: ``train_data_large.pkl``, ``val_data.pkl``,
``test_data.pkl``; Gao et al., CVPR 2022) and **Pascal1D** (folder ``Pascal1D/``:
``train_data_ins.pkl``, ``val_data_ins.pkl``; Yin et al., ICLR 2020). Each file is a pickled pair
``(images, labels)``:

- ``images``: uint8, indexable as ``[object][sample]`` -> a 128x128 grey image, either one array
  ``(objects, samples, 128, 128[, 1])`` or a list with one ``(samples, 128, 128[, 1])`` array (or one
  list of ``(128, 128[, 1])`` arrays) per object.
- ``labels``: indexable as ``[object][sample]`` -> a vector of K >= 1 numbers whose **last** entry is
  the azimuth as a **fraction of a turn** in [0, 1) (an array ``(objects, samples, K)`` or nested
  lists). Pascal1D's generator writes K = 3 (two position columns, then the normalized angle).

Targets, as the official code encodes them: ShapeNet1D ``(cos a, sin a)`` with ``a = 2*pi*label``
(2 outputs, squared-error loss, angular error in degrees reported); Pascal1D ``10 * label`` (1
output in [0, 10), MSE loss and metric). The official Pascal1D code has no test file: its
meta-test set *is* the validation file, so ``load_pascal1d(splits=("test",))`` reads
``val_data_ins.pkl``.

The pickles are read with a **restricted unpickler** (:func:`safe_load_pickle`): only numpy arrays,
numpy scalars/dtypes and builtin containers can be built; any other global (``os.system``,
``builtins.exec``, a class from some package...) stops the load with a :class:`DataError` before
anything is called, so a crafted file cannot execute code.

**kanji_pose** (the embedded default, no files needed) is shaped like Pascal1D: each object is one
KanjiVG glyph (class-disjoint across splits, via :func:`simt.data.kanji.split_codepoints`), drawn
*once* as a random "handwritten" instance (stroke jitter, slant, scale, shift and pen width fixed per
object, like one physical object), and each sample shows that same drawing rotated by an angle
``theta`` (counter-clockwise on screen). The target is the angle relative to a random per-object
canonical pose ``phi``, in Pascal1D's units (tenths of a turn, 1 unit = 36 degrees)::

    target = ((theta + phi) mod 360) / 36        in [0, 10)

so two samples of one object differ in rotation by ``36 * (t_j - t_i)`` degrees (mod 360). Glyphs that
look the same after a quarter or half turn (口, 田, 十, 一..., a short hand-made list) are skipped,
since their angle is ambiguous (the Pascal1D generator likewise skips its rotation-symmetric classes). When the rotated
drawing does not fit the frame the renderer shrinks it, so apparent size varies a little with the
angle. Built arrays are cached in the user's cache directory like the kanji classification data.

Public API: :class:`RegressionSplit`, :class:`DataError`, :func:`safe_load_pickle`,
:func:`load_shapenet1d`, :func:`load_pascal1d`, :func:`kanji_pose`, :func:`kanji_pose_cache_path`,
:func:`angular_error_degrees`, :func:`angular_error`, :func:`mse`, :func:`azimuth_loss`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import functools
import json
import math
import multiprocessing
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from simt.data import kanji as _kanji
from simt.data.cache import default_cache_dir, load_or_build, save_npz_atomic
from simt.data.safe_pickle import DataError, _fail, safe_load_pickle

__all__ = [
    "DataError",
    "KANJI_POSE_DEFAULT_SPLITS",
    "KANJI_POSE_VERSION",
    "PASCAL1D_FILES",
    "RegressionSplit",
    "SHAPENET1D_FILES",
    "angular_error",
    "angular_error_degrees",
    "azimuth_loss",
    "kanji_pose",
    "kanji_pose_cache_path",
    "load_pascal1d",
    "load_shapenet1d",
    "mse",
    "safe_load_pickle",
]




# ---------------------------------------------------------------------------------------------
# The in-memory split
# ---------------------------------------------------------------------------------------------


@dataclass
class RegressionSplit:
    """One split of a regression data set: object ``k`` (one task) is rows ``offsets[k]:offsets[k+1]``.

    Attributes:
        images: uint8 (N, S, S, 1), channels last as in the pickles, ink/object bright or dark as
            the source has it; ``x.float() / 255`` (channels first) is the network input.
        targets: float32 (N, D): ShapeNet1D D=2 ``(cos, sin)`` of the azimuth; Pascal1D and
            kanji_pose D=1, the angle in tenths of a turn in [0, 10).
        offsets: int64 (objects + 1,), starts at 0, strictly increasing, ends at N.
        object_ids: int64 (objects,) or None: where each object comes from (kanji_pose: the
            character's code point; pickles: the object's index in the file).
    """

    images: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray
    object_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        im, t, off = self.images, self.targets, self.offsets
        if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 4 and im.shape[3] == 1
                and im.shape[1] == im.shape[2]):
            raise ValueError(f"RegressionSplit.images must be uint8 (N, S, S, 1), got "
                             f"{getattr(im, 'dtype', type(im))} {getattr(im, 'shape', '')}")
        if not (isinstance(t, np.ndarray) and t.dtype == np.float32 and t.ndim == 2 and len(t) == len(im)):
            raise ValueError(f"RegressionSplit.targets must be float32 (N={len(im)}, D), got "
                             f"{getattr(t, 'dtype', type(t))} {getattr(t, 'shape', '')}")
        if not (isinstance(off, np.ndarray) and off.dtype == np.int64 and off.ndim == 1 and len(off) >= 2
                and off[0] == 0 and off[-1] == len(im) and bool(np.all(np.diff(off) > 0))):
            raise ValueError(f"RegressionSplit.offsets must be int64 (objects + 1,), strictly increasing "
                             f"from 0 to N={len(im)}")
        if self.object_ids is not None and (self.object_ids.dtype != np.int64
                                            or self.object_ids.shape != (len(off) - 1,)):
            raise ValueError("RegressionSplit.object_ids must be int64 (objects,)")

    @property
    def num_objects(self) -> int:
        return len(self.offsets) - 1

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def target_dim(self) -> int:
        return int(self.targets.shape[1])

    def samples_per_object(self) -> np.ndarray:
        """int64 (objects,): how many samples each object has."""
        return np.diff(self.offsets)

    def object(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, S, S, 1), targets (n, D)) of object ``k`` (views, no copy)."""
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        return self.images[a:b], self.targets[a:b]


# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------

# Python 2 module names (pickle maps them itself, but only in the find_class we override).
# ---------------------------------------------------------------------------------------------
# Pickle contents -> RegressionSplit
# ---------------------------------------------------------------------------------------------

SHAPENET1D_FILES = {"train": "train_data_{data_size}.pkl", "val": "val_data.pkl", "test": "test_data.pkl"}
PASCAL1D_FILES = {"train": "train_data_ins.pkl", "val": "val_data_ins.pkl", "test": "val_data_ins.pkl"}

_PAIR = ("a pickled pair (images, labels): images uint8 (objects, samples, {s}, {s}[, 1]) or one such "
         "stack per object, labels (objects, samples, K) whose last column is the azimuth as a fraction "
         "of a turn")


def _is_seq(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) or (isinstance(obj, np.ndarray) and obj.dtype == object)


def _check_pixels(a: np.ndarray, path: str, where: str) -> np.ndarray:
    """uint8 as is; other real dtypes must hold values in [0, 255] (the official code divides by 255)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise _fail(path, f"{where}: expected uint8 pixels, got dtype {a.dtype}")
    if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 255):
        raise _fail(path, f"{where}: expected pixel values in [0, 255] (uint8), got dtype {a.dtype} with values "
                          f"outside")
    return np.rint(a).astype(np.uint8) if np.issubdtype(a.dtype, np.floating) else a.astype(np.uint8)


def _image_stack(a: Any, path: str, where: str, size: int | None) -> np.ndarray:
    """One object's samples as (samples, S, S, 1) (any pixel dtype, checked later)."""
    if _is_seq(a):
        items = list(a)
        if not items:
            raise _fail(path, f"{where}: expected at least one image, got none")
        shapes = set()
        for i, im in enumerate(items):
            if not isinstance(im, np.ndarray) or im.dtype == object or im.ndim not in (2, 3):
                raise _fail(path, f"{where}, sample {i}: expected an image array (H, W[, 1]), got "
                                  f"{type(im).__name__} {getattr(im, 'shape', '')}")
            shapes.add(im.shape)
        if len(shapes) > 1:
            raise _fail(path, f"{where}: expected images of one shape, got {sorted(shapes)}")
        a = np.stack(items)
    if not isinstance(a, np.ndarray):
        raise _fail(path, f"{where}: expected an image array, got {type(a).__name__}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[0] < 1 or a.shape[3] != 1 or a.shape[1] != a.shape[2]:
        raise _fail(path, f"{where}: expected grey square images (samples, H, W[, 1]), got shape {a.shape}")
    if size is not None and a.shape[1] != size:
        raise _fail(path, f"{where}: expected {size}x{size} images, got {a.shape[1]}x{a.shape[2]}")
    return a


def _label_matrix(y: Any, path: str, where: str) -> np.ndarray:
    """One object's labels as float (samples, K)."""
    try:
        arr = np.asarray(y) if not isinstance(y, np.ndarray) or y.dtype == object else y
        if arr.dtype == object:
            arr = np.array(arr.tolist())
    except (ValueError, TypeError):
        raise _fail(path, f"{where}: expected labels (samples, K) of numbers, got ragged or mixed data") from None
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise _fail(path, f"{where}: expected numeric labels (samples, K), got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise _fail(path, f"{where}: expected labels (samples, K) with K >= 1, got shape {arr.shape}")
    return arr


def _read_pair(path: str, size: int | None, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, S, S, 1), label fraction float32 (N,), offsets int64) from one pickle file."""
    layout = _PAIR.format(s=size if size is not None else "S")
    data = safe_load_pickle(path)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        got = f"{type(data).__name__} of length {len(data)}" if isinstance(data, (tuple, list, dict)) \
            else type(data).__name__
        raise _fail(path, f"expected {layout}; got a {got}")
    xs, ys = data

    # Images: one (objects, samples, ...) array (the fast path: no copy when already uint8), or one
    # entry per object.
    if isinstance(xs, np.ndarray) and xs.dtype != object:
        if xs.ndim not in (4, 5) or xs.shape[0] < 1:
            raise _fail(path, f"expected images (objects, samples, {size or 'S'}, {size or 'S'}[, 1]), got "
                              f"shape {xs.shape}")
        objects, samples = xs.shape[:2]
        stack = _image_stack(xs.reshape(objects * samples, *xs.shape[2:]), path, "images", size)
        images = np.ascontiguousarray(_check_pixels(stack, path, "images"))
        counts = np.full(objects, samples, dtype=np.int64)
    elif _is_seq(xs):
        per_object = [_image_stack(x, path, f"images of object {k}", size) for k, x in enumerate(xs)]
        if not per_object:
            raise _fail(path, f"expected {layout}; got no objects")
        sides = {a.shape[1] for a in per_object}
        if len(sides) > 1:
            raise _fail(path, f"expected images of one size, got sides {sorted(sides)}")
        counts = np.array([len(a) for a in per_object], dtype=np.int64)
        side = per_object[0].shape[1]
        images = np.empty((int(counts.sum()), side, side, 1), dtype=np.uint8)
        pos = 0
        for k, a in enumerate(per_object):
            images[pos:pos + len(a)] = _check_pixels(a, path, f"images of object {k}")
            pos += len(a)
        del per_object
    else:
        raise _fail(path, f"expected {layout}; images are a {type(xs).__name__}")

    # Labels: the last column of (objects, samples, K), as the official code (y[:, :, -1]).
    if isinstance(ys, np.ndarray) and ys.dtype != object:
        if ys.ndim != 3 or ys.shape[2] < 1:
            raise _fail(path, f"expected labels (objects, samples, K), got shape {ys.shape}")
        if ys.shape[0] != len(counts) or np.any(counts != ys.shape[1]):
            raise _fail(path, f"labels {ys.shape[:2]} do not match the images' (objects={len(counts)}, "
                              f"samples={sorted(set(counts.tolist()))})")
        per_label = [_label_matrix(ys[k], path, f"labels of object {k}") for k in range(len(ys))]
    elif _is_seq(ys):
        if len(ys) != len(counts):
            raise _fail(path, f"labels cover {len(ys)} objects but the images {len(counts)}")
        per_label = [_label_matrix(y, path, f"labels of object {k}") for k, y in enumerate(ys)]
    else:
        raise _fail(path, f"expected {layout}; labels are a {type(ys).__name__}")
    for k, (lab, n) in enumerate(zip(per_label, counts)):
        if len(lab) != n:
            raise _fail(path, f"object {k} has {n} images but {len(lab)} labels")
    fraction = np.concatenate([lab[:, -1] for lab in per_label]).astype(np.float32)
    if not np.isfinite(fraction).all():
        raise _fail(path, "labels contain NaN or infinity")
    if fraction.size and (fraction.min() < -1.0 or fraction.max() > 1.0):
        raise _fail(path, f"expected the last label column to be the azimuth as a fraction of a turn in [0, 1) "
                          f"(as the {dataset} files store it), got values in [{fraction.min():.4g}, "
                          f"{fraction.max():.4g}] (degrees or radians?)")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return images, fraction, offsets


def _check_root(root: str | os.PathLike, dataset: str, files: Iterable[str]) -> Path:
    folder = Path(root)
    if not folder.is_dir():
        raise _fail(folder, f"missing {dataset} folder; expected a folder holding {', '.join(files)} "
                            f"(set data_dir to the folder that contains {dataset}/)")
    return folder


def _check_splits(splits: Sequence[str], known: Mapping[str, str], dataset: str) -> list[str]:
    if isinstance(splits, str):
        splits = (splits,)
    out = [str(s) for s in splits]
    bad = [s for s in out if s not in known]
    if bad:
        raise ValueError(f"{dataset}: unknown split(s) {bad}; known: {sorted(known)}")
    return out


def load_shapenet1d(root: str | os.PathLike, splits: Sequence[str] = ("train", "val", "test"), *,
                    data_size: str = "large", image_size: int | None = 128) -> dict[str, RegressionSplit]:
    """Read ShapeNet1D from its folder (``<data_dir>/ShapeNet1D``).

    Files: ``train_data_<data_size>.pkl`` (the official code uses ``large``), ``val_data.pkl``,
    ``test_data.pkl``. Targets: float32 (N, 2) ``(cos a, sin a)``, ``a = 2*pi*label`` computed in
    float32 as the official code does.

    Raises:
        DataError: a missing folder or file, or a file that is not the expected pair of arrays.
    """
    names = {k: v.format(data_size=data_size) for k, v in SHAPENET1D_FILES.items()}
    wanted = _check_splits(splits, names, "ShapeNet1D")
    folder = _check_root(root, "ShapeNet1D", [names[s] for s in wanted])
    out = {}
    for split in wanted:
        images, frac, offsets = _read_pair(str(folder / names[split]), image_size, "ShapeNet1D")
        angle = frac * np.float32(2.0) * np.float32(np.pi)  # float32 throughout, like the official code
        targets = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
        out[split] = RegressionSplit(images, targets, offsets, np.arange(len(offsets) - 1, dtype=np.int64))
    return out


def load_pascal1d(root: str | os.PathLike, splits: Sequence[str] = ("train", "val"), *,
                  image_size: int | None = 128) -> dict[str, RegressionSplit]:
    """Read Pascal1D from its folder (``<data_dir>/Pascal1D``).

    Files: ``train_data_ins.pkl``, ``val_data_ins.pkl``. ``"test"`` may be asked for: it is the
    validation file (the official code meta-tests on it) and shares its arrays. Targets: float32
    (N, 1) ``10 * label`` (the normalized azimuth times 10, in [0, 10)).

    Raises:
        DataError: a missing folder or file, or a file that is not the expected pair of arrays.
    """
    wanted = _check_splits(splits, PASCAL1D_FILES, "Pascal1D")
    folder = _check_root(root, "Pascal1D", sorted({PASCAL1D_FILES[s] for s in wanted}))
    by_file: dict[str, RegressionSplit] = {}
    out = {}
    for split in wanted:
        name = PASCAL1D_FILES[split]
        if name not in by_file:
            images, frac, offsets = _read_pair(str(folder / name), image_size, "Pascal1D")
            targets = (frac * np.float32(10.0))[:, None].astype(np.float32)
            by_file[name] = RegressionSplit(images, targets, offsets, np.arange(len(offsets) - 1, dtype=np.int64))
        out[split] = by_file[name]
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def angular_error_degrees(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Absolute angle between ``atan2(sin, cos)`` of ``pred`` and of ``target``, in degrees, in [0, 180].

    Both are (..., 2) ``(cos, sin)`` pairs (need not be unit length); returns (...,). Computed in
    float64 and returned in ``pred``'s floating dtype. Differs from the official ``degree_loss``, which
    takes the predicted angle from ``acos`` of the cosine output alone (exact only for unit vectors).
    """
    if pred.shape != target.shape or pred.shape[-1:] != (2,):
        raise ValueError(f"angular_error_degrees: expected two (..., 2) (cos, sin) tensors of one shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    p = pred.detach().double()
    t = target.detach().to(p.device).double()
    diff = torch.remainder(torch.atan2(p[..., 1], p[..., 0]) - torch.atan2(t[..., 1], t[..., 0]), 2 * math.pi)
    diff = torch.minimum(diff, 2 * math.pi - diff)
    out = torch.rad2deg(diff).clamp_(0.0, 180.0)
    return out.to(pred.dtype if pred.is_floating_point() else torch.float32)


def acos_angular_error_degrees(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official code's angular error: the predicted angle is acos of the cosine output alone, taken as
    360° minus it where the sine output is negative; the target's from atan2 (its exact (cos, sin) pair).
    Both in [0, 360), then the shorter way round, in degrees. Equals `angular_error_degrees` for unit
    predictions; the tanh outputs are not unit vectors, so in general it does not."""
    p, t = pred.detach().double(), target.detach().to(pred.device).double()
    predicted = torch.acos(p[..., 0].clamp(-1.0, 1.0))
    predicted = torch.where(p[..., 1] < 0, 2 * math.pi - predicted, predicted)
    diff = torch.remainder(predicted - torch.atan2(t[..., 1], t[..., 0]), 2 * math.pi)
    diff = torch.minimum(diff, 2 * math.pi - diff)
    return torch.rad2deg(diff).clamp_(0.0, 180.0).to(pred.dtype if pred.is_floating_point() else torch.float32)


ANGLES = {"atan2": angular_error_degrees, "acos": acos_angular_error_degrees}


def angular_error_values(outputs: torch.Tensor, targets: torch.Tensor, angle: str = "atan2") -> torch.Tensor:
    """Mean angular error in degrees of every episode of a stack: (..., N, 2) -> (...,) float64, on the
    outputs' device (no host sync). `angle`: how the predicted angle is read (ANGLES)."""
    return ANGLES[angle](outputs, targets).double().mean(dim=-1)


def angular_error(outputs: torch.Tensor, targets: torch.Tensor, angle: str = "atan2") -> float:
    """Mean angular error in degrees (ShapeNet1D's reported metric; lower is better)."""
    return angular_error_values(outputs, targets, angle).item()


def mse_values(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the elements of every episode of a stack: (..., N, D) -> (...,) float64, on
    the outputs' device (no host sync)."""
    if outputs.shape != targets.shape or outputs.dim() < 2:
        raise ValueError(f"mse: expected outputs and targets of one (..., N, D) shape, got {tuple(outputs.shape)} "
                         f"and {tuple(targets.shape)}")
    return (outputs.detach().double() - targets.detach().double()).square().flatten(-2).mean(dim=-1)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error over all elements of one episode's (N, D) outputs (Pascal1D's metric,
    ``nn.MSELoss``; lower is better)."""
    return mse_values(outputs, targets).item()


def azimuth_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ShapeNet1D's training loss (differentiable): squared error summed over (cos, sin), mean over
    samples, i.e. twice ``F.mse_loss`` on the same tensors."""
    return ((outputs - targets) ** 2).sum(dim=-1).mean()


# The trainer/evaluator can read the objective direction from the metric itself.
angular_error.higher_is_better = False  # type: ignore[attr-defined]
mse.higher_is_better = False  # type: ignore[attr-defined]
# A mean over samples: the batched engine may compute several tasks' losses in one call (simt.losses).
azimuth_loss.mean_over_samples = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# kanji_pose: the embedded Pascal1D-shaped regression default
# ---------------------------------------------------------------------------------------------

# Bump whenever anything that changes kanji_pose's arrays changes (it is part of the cache name;
# the kanji renderer's own version is part of the key too).
KANJI_POSE_VERSION = 1
KANJI_POSE_DEFAULT_SPLITS = {"train": 200, "val": 50, "test": 50}
_POSE_TAG = 0x706F7365  # "pose": keeps these random streams apart from the classification data's
_TARGET_UNIT_DEG = 36.0  # one target unit = a tenth of a turn, as Pascal1D's label x 10


# Characters that look the same, or nearly, after a quarter or half turn: their angle is ambiguous,
# so they are never objects. A hand-made list (geometric tests on KanjiVG's hand-drawn strokes do not
# separate these from dense asymmetric glyphs); not exhaustive, but such glyphs are rare in a random
# pick from the ~6,400 mostly complex characters.
_SYMMETRIC = frozenset("一二三十口囗日曰田目回工王中井亜亞凹串米卍卐互吕呂昌毌畕畺冊卌乂爻丨丶")


def _rotation_symmetric(codepoint: int) -> bool:
    """Whether the character is on the list of glyphs that (nearly) map onto themselves under a turn."""
    return chr(codepoint) in _SYMMETRIC


def _normalize_pose_splits(split_classes: Mapping[str, int] | None) -> dict[str, int]:
    splits = dict(KANJI_POSE_DEFAULT_SPLITS if split_classes is None else split_classes)
    splits = {str(k): int(v) for k, v in splits.items()}
    for name, n in splits.items():
        if n < 1:
            raise ValueError(f"kanji_pose: split {name!r} asks for {n} objects; must be >= 1")
    return splits


def _pose_codepoints(splits: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Class-disjoint glyphs per split: walk one seeded permutation of all characters (from
    ``split_codepoints``), skipping rotation-symmetric glyphs, filling the splits in order."""
    available = len(_kanji.available_codepoints())
    if sum(splits.values()) > available:
        raise ValueError(f"kanji_pose: asked for {sum(splits.values())} objects ({splits}) but kanjivg "
                         f"{_kanji.kanjivg_version()} has only {available} characters, fewer usable ones")
    pool = _kanji.split_codepoints({"pool": available}, seed)["pool"]
    out: dict[str, list[int]] = {name: [] for name in splits}
    order = [name for name, n in splits.items() for _ in range(n)]
    it = iter(pool)
    for name in order:
        for cp in it:
            if not _rotation_symmetric(cp):
                out[name].append(cp)
                break
        else:
            raise ValueError(f"kanji_pose: asked for {sum(splits.values())} objects ({splits}) but kanjivg "
                             f"{_kanji.kanjivg_version()} has fewer usable (non-symmetric) characters")
    return out


def _glyph_renderer(strokes: list[np.ndarray], image_size: int):
    """``(rng, rotation) -> image``, equal to ``render_glyph(strokes, rng, image_size, rotation)``.

    ``render_glyph`` prepares the glyph (stroke packing, flattening plan) on every call, about a
    third of the cost of one drawing; all samples of an object share the glyph, so prepare it once
    when the renderer's internals are as expected (else fall back to the public function).
    """
    glyph_cls, draw = getattr(_kanji, "_Glyph", None), getattr(_kanji, "_draw", None)
    if glyph_cls is not None and draw is not None:
        try:
            glyph = glyph_cls(strokes, image_size)
            return lambda rng, rotation: draw(glyph, rng, image_size, rotation)
        except TypeError:
            pass
    return lambda rng, rotation: _kanji.render_glyph(strokes, rng, image_size, rotation=rotation)


def _render_pose_object(codepoint: int, samples: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One object: uint8 (samples, S, S) and float32 (samples,) targets. Depends only on the arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, codepoint, _POSE_TAG, 0]))
    phi = rng.uniform(0.0, 360.0)  # the object's canonical pose
    # Stratified angles (each sample in its own 360/samples sector), in a random order.
    theta = (np.arange(samples) + rng.uniform(0.0, 1.0, samples)) * (360.0 / samples)
    theta = theta[rng.permutation(samples)]
    render = _glyph_renderer(_kanji.load_strokes(codepoint), image_size)
    images = np.empty((samples, image_size, image_size), dtype=np.uint8)
    for i, angle in enumerate(theta):
        # The same drawing stream for every sample: only the rotation differs.
        draw_rng = np.random.default_rng(np.random.SeedSequence([seed, codepoint, _POSE_TAG, 1]))
        images[i] = render(draw_rng, float(angle))
    targets = (np.mod(theta + phi, 360.0) / _TARGET_UNIT_DEG).astype(np.float32)
    targets[targets >= 10.0] = 0.0  # float32 rounding of values just below 10
    return images, targets


def _render_pose_chunk(job: tuple[int, list[int], int, int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    first, codes, samples, image_size, seed = job
    imgs = np.empty((len(codes), samples, image_size, image_size), dtype=np.uint8)
    tgts = np.empty((len(codes), samples), dtype=np.float32)
    for j, cp in enumerate(codes):
        imgs[j], tgts[j] = _render_pose_object(cp, samples, image_size, seed)
    return first, imgs, tgts


def _pool_context():
    # The workers only run numpy/PIL code, so fork (instant start) is safe where available.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _pose_key(splits: dict[str, int], samples: int, image_size: int, seed: int) -> str:
    return json.dumps({
        "kanji_pose": KANJI_POSE_VERSION,
        "renderer": _kanji.RENDERER_VERSION,
        "kanjivg": _kanji.kanjivg_version(),
        "splits": [[k, v] for k, v in splits.items()],
        "samples": samples,
        "image_size": image_size,
        "seed": seed,
        "skipped": "".join(sorted(_SYMMETRIC)),
    }, separators=(",", ":"))


def kanji_pose_cache_path(split_classes: Mapping[str, int] | None = None, samples_per_object: int = 30,
                          image_size: int = 64, seed: int = 0,
                          cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`kanji_pose` caches the arrays for these parameters."""
    key = _pose_key(_normalize_pose_splits(split_classes), int(samples_per_object), int(image_size), int(seed))
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"kanji-pose-v{KANJI_POSE_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _checksum(arrays: Iterable[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).ravel(), crc)
    return crc


def _read_pose_cache(path: Path, key: str, codes: dict[str, list[int]], samples: int,
                     size: int) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The cached arrays, or None when the file is missing, unreadable or does not match."""
    if not path.is_file():
        return None
    expected = {"key", "checksum"} | {f"{p}{j}" for j in range(len(codes)) for p in "xtc"}
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            if set(f.files) != expected or str(f["key"][()]) != key:
                return None
            out, arrays = {}, []
            for j, (name, cps) in enumerate(codes.items()):
                x, t, c = f[f"x{j}"], f[f"t{j}"], f[f"c{j}"]
                if x.dtype != np.uint8 or x.shape != (len(cps) * samples, size, size, 1):
                    return None
                if t.dtype != np.float32 or t.shape != (len(cps) * samples, 1) or c.tolist() != cps:
                    return None
                out[name] = (x, t)
                arrays += [x, t]
            if int(f["checksum"][()]) != _checksum(arrays):
                return None
            return out
    except Exception:  # truncated zip, bad header, bad array data...: any failure means rebuild
        return None


def _write_pose_cache(path: Path, key: str, codes: dict[str, list[int]],
                      arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    flat = [a for name in codes for a in arrays[name]]
    payload = {"key": np.array(key), "checksum": np.array(_checksum(flat), dtype=np.int64)}
    for j, name in enumerate(codes):
        payload[f"x{j}"], payload[f"t{j}"] = arrays[name]
        payload[f"c{j}"] = np.array(codes[name], dtype=np.int64)
    save_npz_atomic(path, payload)


def _build_pose(codes: dict[str, list[int]], samples: int, image_size: int, seed: int, workers: int,
                progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    allcodes = [cp for cps in codes.values() for cp in cps]
    images = np.empty((len(allcodes), samples, image_size, image_size), dtype=np.uint8)
    targets = np.empty((len(allcodes), samples), dtype=np.float32)
    bar = tqdm(total=len(allcodes), desc="rendering kanji_pose", unit="object", disable=not progress,
               file=sys.stderr)
    with bar:
        if workers <= 1 or len(allcodes) <= 1:
            for j, cp in enumerate(allcodes):
                images[j], targets[j] = _render_pose_object(cp, samples, image_size, seed)
                bar.update(1)
        else:
            n_chunks = min(len(allcodes), workers * 8)  # several per worker: glyphs differ in cost
            bounds = np.linspace(0, len(allcodes), n_chunks + 1).astype(int)
            jobs = [(int(a), allcodes[a:b], samples, image_size, seed) for a, b in zip(bounds[:-1], bounds[1:])]
            with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, n_chunks),
                                                        mp_context=_pool_context()) as pool:
                for first, imgs, tgts in pool.map(_render_pose_chunk, jobs):
                    images[first:first + len(imgs)], targets[first:first + len(tgts)] = imgs, tgts
                    bar.update(len(imgs))
    out, pos = {}, 0
    for name, cps in codes.items():
        n = len(cps)
        out[name] = (images[pos:pos + n].reshape(n * samples, image_size, image_size, 1),
                     targets[pos:pos + n].reshape(n * samples, 1))
        pos += n
    return out


def kanji_pose(split_classes: Mapping[str, int] | None = None, samples_per_object: int = 30,
               image_size: int = 64, seed: int = 0, cache_dir: str | os.PathLike | None = None,
               workers: int | None = None, progress: bool = True) -> dict[str, RegressionSplit]:
    """Build (or load from cache) the embedded rotation-regression data set (see the module docstring).

    Args:
        split_classes: objects (glyphs) per split, e.g. ``{"train": 200, "val": 50, "test": 50}``
            (the default); class-disjoint, cut in this order from one seeded permutation.
        samples_per_object: rotated renderings per glyph (angles stratified over the full turn).
        image_size: image side in pixels.
        seed: decides the glyphs, each object's drawing, canonical pose and angles.
        cache_dir: folder of the ``.npz`` cache; None means :func:`simt.data.kanji.default_cache_dir`.
        workers: rendering processes (None: ``os.cpu_count()``); the result does not depend on it.
        progress: show a tqdm bar on stderr while rendering.

    Returns:
        ``{split: RegressionSplit}`` with uint8 images (objects * samples, S, S, 1) (ink bright on 0),
        float32 targets (N, 1) in [0, 10) (tenths of a turn: ``((theta + phi) mod 360) / 36`` for a
        counter-clockwise rotation ``theta`` in degrees and the object's canonical pose ``phi``),
        equal ``samples_per_object`` per object, and ``object_ids`` = the glyphs' code points.
    """
    samples, image_size, seed = int(samples_per_object), int(image_size), int(seed)
    if samples < 2:
        raise ValueError(f"kanji_pose: samples_per_object must be >= 2 (support + query), got {samples}")
    if image_size < 16:
        raise ValueError(f"kanji_pose: image_size must be >= 16, got {image_size}")
    if seed < 0:
        raise ValueError(f"kanji_pose: seed must be >= 0, got {seed}")
    splits = _normalize_pose_splits(split_classes)
    codes = _pose_codepoints(splits, seed)
    key = _pose_key(splits, samples, image_size, seed)
    path = kanji_pose_cache_path(splits, samples, image_size, seed, cache_dir)
    n_workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    arrays = load_or_build(path, lambda: _read_pose_cache(path, key, codes, samples, image_size),
                           lambda: _build_pose(codes, samples, image_size, seed, n_workers, progress),
                           lambda built: _write_pose_cache(path, key, codes, built), "kanji_pose")
    out = {}
    for name, cps in codes.items():
        x, t = arrays[name]
        offsets = np.arange(0, len(cps) * samples + 1, samples, dtype=np.int64)
        out[name] = RegressionSplit(np.ascontiguousarray(x), np.ascontiguousarray(t), offsets,
                                    np.array(cps, dtype=np.int64))
    return out


# ---------------------------------------------------------------------------------------------
# As FewShotDatasets (what `dataset=shapenet1d|pascal1d|kanji_pose` instantiates)
# ---------------------------------------------------------------------------------------------

def _as_dataset(splits: dict[str, RegressionSplit], name: str, **scoring) -> "FewShotDataset":
    from simt.data import FewShotDataset, ObjectSplit

    def to_torch(split: RegressionSplit) -> ObjectSplit:
        images = torch.from_numpy(np.ascontiguousarray(split.images)).permute(0, 3, 1, 2)  # (N, 1, S, S)
        return ObjectSplit(images, torch.from_numpy(split.targets).float(), torch.from_numpy(split.offsets))

    target_dim = next(iter(splits.values())).target_dim
    return FewShotDataset({k: to_torch(v) for k, v in splits.items()}, name, target_dim=target_dim, **scoring)


def regression_dataset(name: str, root: str | os.PathLike, image_size: int = 128,
                       angle: str = "atan2") -> "FewShotDataset":
    """ShapeNet1D: (cos, sin) targets, the official squared-error loss, angular error in degrees (the
    predicted angle by `angle`: atan2 of both outputs, or acos of the cosine as the official code), tanh
    outputs. Pascal1D: the angle label x10, MSE (its test split is its validation file, as officially)."""
    from simt.evaluator import Metric

    if angle not in ANGLES:
        raise DataError(None, f"dataset.angle={angle!r}: expected one of {', '.join(ANGLES)}")
    if name == "shapenet1d":
        return _as_dataset(load_shapenet1d(root, image_size=image_size), name, loss=azimuth_loss,
                           metric=Metric(functools.partial(angular_error, angle=angle), "angular_error",
                                         higher_is_better=False,
                                         values=functools.partial(angular_error_values, angle=angle)),
                           output_activation="tanh")
    if name == "pascal1d":
        return _as_dataset(load_pascal1d(root, ("train", "val", "test"), image_size=image_size), name,
                           loss=torch.nn.functional.mse_loss,
                           metric=Metric(mse, "mse", higher_is_better=False, values=mse_values))
    raise DataError(None, f"regression dataset {name!r}: expected shapenet1d or pascal1d")


def kanji_pose_dataset(split_classes: Mapping[str, int], samples_per_object: int = 30, image_size: int = 64,
                       seed: int = 0) -> "FewShotDataset":
    """The embedded Pascal1D-shaped default: rotation angle of a kanji glyph, MSE."""
    from simt.evaluator import Metric

    splits = kanji_pose(dict(split_classes), samples_per_object, image_size, seed, progress=sys.stderr.isatty())
    return _as_dataset(splits, "kanji_pose", loss=torch.nn.functional.mse_loss,
                       metric=Metric(mse, "mse", higher_is_better=False, values=mse_values))
