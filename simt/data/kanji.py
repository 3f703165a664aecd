"""Embedded default few-shot data set: handwritten-looking kanji rendered from KanjiVG strokes.

The glyph data comes from KanjiVG (https://kanjivg.tagaini.net), copyright (C) Ulrich Apel,
distributed under the Creative Commons Attribution-Share Alike 3.0 licence
(https://creativecommons.org/licenses/by-sa/3.0/). It is read from the PyPI package ``kanjivg``,
which installs one SVG per character (``kanji/04e00.svg`` ...). Images built from it are derived
works and carry the same licence.

One class per character (the plain ``<5 hex digits>.svg`` files; the ``-Kaisho`` etc. variant files
are ignored). Every instance is a fresh random "handwritten" drawing of the character: the stroke
control points are jittered, each stroke is nudged, the whole glyph gets a random slant, scale,
rotation and shift, and the pen width is random. Drawing is antialiased by rendering at several
times the output resolution and box-downsampling.

The randomness of instance ``i`` of character ``c`` comes only from ``(seed, c, i)``, so a build is
bitwise reproducible whatever the number of worker processes or the other classes requested. Built
arrays are cached as ``.npz`` files in the user's cache directory (see :func:`default_cache_dir`).

Public API: :func:`load_kanji` (what the rest of the system calls), :func:`split_codepoints`,
:func:`cache_path`, :func:`available_codepoints`, :func:`load_strokes`, :func:`parse_path`,
:func:`flatten_chain`, :func:`render_glyph`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from simt.data.cache import default_cache_dir, load_or_build, save_npz_atomic

__all__ = [
    "RENDERER_VERSION",
    "available_codepoints",
    "cache_path",
    "default_cache_dir",
    "flatten_chain",
    "kanji_dataset",
    "kanjivg_dir",
    "kanjivg_version",
    "load_kanji",
    "load_strokes",
    "parse_path",
    "render_glyph",
    "split_codepoints",
]

# Bump whenever anything that changes the pixels changes (parser, jitter, affine, pen, filter):
# it is part of the cache file name, so stale caches are never reused.
RENDERER_VERSION = 2

# ---------------------------------------------------------------------------------------------
# Locating the KanjiVG files
# ---------------------------------------------------------------------------------------------

_PLAIN_SVG_RE = re.compile(r"^([0-9a-f]{5})\.svg$")


@functools.lru_cache(maxsize=1)
def kanjivg_dir() -> Path:
    """The folder of KanjiVG SVG files installed by the ``kanjivg`` package."""
    try:
        dist = importlib.metadata.distribution("kanjivg")
        folder = Path(dist.locate_file("kanji"))
        if folder.is_dir():
            return folder
    except importlib.metadata.PackageNotFoundError:
        pass
    # Fallback (e.g. unusual installs): the top-level "kanji" folder is importable as a namespace.
    spec = importlib.util.find_spec("kanji")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "04e00.svg").is_file():
                return Path(loc)
    raise ImportError("the KanjiVG data is missing: install it with `pip install kanjivg`")


@functools.lru_cache(maxsize=1)
def kanjivg_version() -> str:
    """Version of the installed ``kanjivg`` package (part of the cache key)."""
    try:
        return importlib.metadata.version("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# CJK ideographs only: KanjiVG also draws kana, Latin letters, digits and punctuation, which would add
# near-duplicate classes (l/I/1, O/o/0, small vs. full-size kana) and near-empty ones ("." and ",").
_IDEOGRAPH_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FFFF))


def _is_ideograph(codepoint: int) -> bool:
    return any(low <= codepoint <= high for low, high in _IDEOGRAPH_RANGES)


@functools.lru_cache(maxsize=1)
def available_codepoints() -> tuple[int, ...]:
    """Sorted code points of every CJK ideograph with a plain (non-variant) KanjiVG file."""
    codes = []
    for name in os.listdir(kanjivg_dir()):
        m = _PLAIN_SVG_RE.match(name)
        if m and _is_ideograph(int(m.group(1), 16)):
            codes.append(int(m.group(1), 16))
    return tuple(sorted(codes))


# ---------------------------------------------------------------------------------------------
# SVG path data -> cubic Bézier chains
# ---------------------------------------------------------------------------------------------

# A token is a command letter or a number. Numbers may run together ("1.5-2", "0.5.5" = 0.5 .5).
_TOKEN_RE = re.compile(
    r"(?P<cmd>[MmZzLlHhVvCcSsQqTtAa])"
    r"|(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<sep>[\s,]+)"
    r"|(?P<bad>.)",
    re.DOTALL,
)
_N_PARAMS = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "A": 7, "Z": 0}


def _tokenize(d: str) -> list[str | float]:
    tokens: list[str | float] = []
    for m in _TOKEN_RE.finditer(d):
        kind = m.lastgroup
        if kind == "cmd":
            tokens.append(m.group())
        elif kind == "num":
            tokens.append(float(m.group()))
        elif kind == "bad":
            raise ValueError(f"bad character {m.group()!r} at {m.start()} in path data {d!r}")
    return tokens


def parse_path(d: str) -> list[np.ndarray]:
    """Parse SVG path data (the ``d`` attribute) into cubic Bézier chains, one per subpath.

    Supports M/m, L/l, H/h, V/v, C/c, S/s, Q/q, T/t and Z/z, with implicitly repeated parameter
    groups (after M/m they mean L/l), relative coordinates, and the reflected first control point
    of S/s (T/t). Lines and quadratics are converted exactly to cubics. Arcs (A/a) are rejected.

    Returns a list of float64 arrays of shape (3K+1, 2): the subpath's start point followed by
    (control 1, control 2, end point) of each of its K cubic segments, in absolute coordinates.
    A subpath with no segments (a lone "M x y") is a (1, 2) array (drawn as a dot).
    """
    tokens = _tokenize(d)
    chains: list[np.ndarray] = []
    chain: list[np.ndarray] | None = None
    cur = np.zeros(2)
    start = np.zeros(2)
    cubic_ctrl: np.ndarray | None = None  # second control of the previous C/S, for S reflection
    quad_ctrl: np.ndarray | None = None  # control of the previous Q/T, for T reflection
    cmd: str | None = None
    moved = False
    i = 0

    def finish() -> None:
        nonlocal chain
        if chain is not None:
            chains.append(np.array(chain, dtype=np.float64))
        chain = None

    def add_cubic(c1: np.ndarray, c2: np.ndarray, p: np.ndarray) -> None:
        nonlocal chain, cur
        if chain is None:  # drawing right after Z continues from the closed subpath's start
            chain = [cur.copy()]
        chain.extend((c1, c2, p))
        cur = p

    while i < len(tokens):
        tok = tokens[i]
        if isinstance(tok, str):
            cmd = tok
            i += 1
            if cmd in "Zz":
                if chain is not None and not np.array_equal(cur, start):
                    add_cubic(cur + (start - cur) / 3, cur + 2 * (start - cur) / 3, start.copy())
                finish()
                cur = start.copy()
                cubic_ctrl = quad_ctrl = None
                continue
        elif cmd is None:
            raise ValueError(f"path data must start with a command: {d!r}")
        elif cmd in "Zz":
            raise ValueError(f"numbers after Z in path data {d!r}")

        upper = cmd.upper()
        n = _N_PARAMS[upper]
        args = tokens[i : i + n]
        if len(args) < n or any(isinstance(a, str) for a in args):
            raise ValueError(f"command {cmd!r} needs {n} numbers in path data {d!r}")
        i += n
        if upper == "A":
            raise ValueError(f"elliptical arcs are not supported (path data {d!r})")
        if upper != "M" and not moved:
            raise ValueError(f"path data must start with M/m: {d!r}")
        v = np.array(args, dtype=np.float64)
        rel = cmd.islower()
        # Relative coordinates are offsets from the current point (for the first m, from 0,0).
        base = cur if rel else np.zeros(2)
        new_cubic = new_quad = None

        if upper == "M":
            moved = True
            finish()
            cur = base + v
            start = cur.copy()
            chain = [cur.copy()]
            cmd = "l" if rel else "L"  # further coordinate pairs are implicit line-tos
        elif upper in "LHV":
            if upper == "L":
                p = base + v
            elif upper == "H":
                p = np.array([base[0] + v[0], cur[1]])
            else:
                p = np.array([cur[0], base[1] + v[0]])
            add_cubic(cur + (p - cur) / 3, cur + 2 * (p - cur) / 3, p)
        elif upper == "C":
            c1, c2, p = base + v[0:2], base + v[2:4], base + v[4:6]
            add_cubic(c1, c2, p)
            new_cubic = c2
        elif upper == "S":
            # First control: the previous C/S's second control reflected about the current point,
            # or the current point itself when the previous command was not a cubic.
            c1 = 2 * cur - cubic_ctrl if cubic_ctrl is not None else cur.copy()
            c2, p = base + v[0:2], base + v[2:4]
            add_cubic(c1, c2, p)
            new_cubic = c2
        elif upper in "QT":
            if upper == "Q":
                q, p = base + v[0:2], base + v[2:4]
            else:
                q = 2 * cur - quad_ctrl if quad_ctrl is not None else cur.copy()
                p = base + v[0:2]
            p0 = cur.copy()
            add_cubic(p0 + 2 / 3 * (q - p0), p + 2 / 3 * (q - p), p)
            new_quad = q
        cubic_ctrl, quad_ctrl = new_cubic, new_quad

    finish()
    return chains


def flatten_chain(chain: np.ndarray, samples_per_segment: int = 6) -> np.ndarray:
    """Sample a cubic Bézier chain (3K+1, 2) into a polyline (K * samples_per_segment + 1, 2)."""
    chain = np.asarray(chain, dtype=np.float64)
    if len(chain) < 4:
        return chain[:1].copy()
    segs = np.stack([chain[0:-1:3], chain[1::3], chain[2::3], chain[3::3]], axis=1)  # (K, 4, 2)
    t = np.linspace(0.0, 1.0, samples_per_segment + 1)[1:, None]  # t=0 is the previous end point
    bern = np.hstack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])  # (T, 4)
    pts = np.einsum("tj,kjd->ktd", bern, segs).reshape(-1, 2)
    return np.vstack([chain[:1], pts])


_SVG_D_RE = re.compile(r"<path\b[^>]*?\sd\s*=\s*\"([^\"]*)\"")


@functools.lru_cache(maxsize=64)
def _load_strokes_cached(codepoint: int, folder: str) -> tuple[np.ndarray, ...]:
    text = (Path(folder) / f"{codepoint:05x}.svg").read_text(encoding="utf-8")
    strokes: list[np.ndarray] = []
    # KanjiVG stores exactly one <path> per stroke, in stroke order; the numbers are <text>.
    for d in _SVG_D_RE.findall(text):
        strokes.extend(parse_path(d))
    if not strokes:
        raise ValueError(f"no stroke paths in KanjiVG file for U+{codepoint:04X}")
    for s in strokes:
        s.setflags(write=False)
    return tuple(strokes)


def load_strokes(codepoint: int) -> list[np.ndarray]:
    """Strokes of one character as Bézier chains (each (3K+1, 2), 109x109 viewBox coordinates)."""
    return list(_load_strokes_cached(int(codepoint), str(kanjivg_dir())))


# ---------------------------------------------------------------------------------------------
# Rendering one random drawing
# ---------------------------------------------------------------------------------------------

_BOX = 109.0  # KanjiVG viewBox side
# All lengths below are in viewBox units (at 28 px, one pixel is 109/28 = 3.9 units).
_NODE_JITTER = 1.0  # sd of the offset of each on-curve point (moved with its two handles)
_HANDLE_JITTER = 0.6  # sd of the extra independent offset of every off-curve control point
_STROKE_SHIFT = 1.3  # sd of the per-stroke translation
_STROKE_ROT = math.radians(3.0)  # sd of the per-stroke rotation about its centroid
_SCALE = (0.82, 1.02)  # uniform global scale range (the glyphs nearly fill the box already)
_ASPECT = 0.08  # log aspect ratio ~ U(-a, a)
_SHEAR = 0.22  # slant: x += k * y, k ~ U(-s, s)
_ROTATION = math.radians(8.0)  # global rotation ~ U(-r, r)
_SHIFT = 5.0  # global translation ~ U(-t, t) per axis
_PEN = (3.6, 6.6)  # pen width range (about 0.9-1.7 px at 28 px); thicker clogs dense glyphs
_MARGIN_PX = 1.3  # empty border kept around the ink, in output pixels (>= 1 after rasterizing)
_SAMPLE_STEP = 1.2  # Bézier flattening step, in output pixels (of control-polygon length)


class _Glyph:
    """A glyph's strokes packed into flat arrays, so one drawing is a few vectorized numpy ops.

    Built once per (character, image size) and reused for every instance.
    """

    def __init__(self, strokes: Sequence[np.ndarray], image_size: int):
        chains = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes]
        if not chains:
            raise ValueError("a glyph needs at least one stroke")
        sizes = np.array([len(c) for c in chains])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n_strokes = len(chains)
        # 3 rows of padding so that a dot's "segment" (start index + 0..3) stays in range.
        self.points = np.vstack(chains + [np.zeros((3, 2))])  # (P + 3, 2)
        self.n_points = int(offsets[-1])
        self.stroke_of = np.repeat(np.arange(self.n_strokes), sizes)  # (P,)
        self.counts = sizes.astype(np.float64)
        # Within a chain, rows 3k-1, 3k, 3k+1 move with on-curve point k; number them globally.
        local = np.concatenate([np.arange(n) for n in sizes])
        node_local = (local + 1) // 3
        node_base = np.concatenate([[0], np.cumsum(sizes // 3 + 1)])[:-1]
        self.node_of = node_base[self.stroke_of] + node_local
        self.n_nodes = int(self.node_of.max()) + 1
        self.handles = np.flatnonzero(local % 3 != 0)

        # Flattening plan: each sample is (first row of its segment, Bernstein weights). The step
        # count comes from the undistorted control polygon; the jitter is too small to matter.
        step = _SAMPLE_STEP * _BOX / image_size
        starts, ts, bounds = [], [], []
        n_samples = 0
        for c, o in zip(chains, offsets[:-1]):
            starts.append([o])  # the stroke's start point: weights (1, 0, 0, 0)
            ts.append([0.0])
            n_samples += 1
            for k in range((len(c) - 1) // 3):
                seg = c[3 * k : 3 * k + 4]
                length = float(np.linalg.norm(np.diff(seg, axis=0), axis=1).sum())
                n = int(min(16, max(1, math.ceil(length / step))))
                starts.append(np.full(n, o + 3 * k))
                ts.append(np.arange(1, n + 1) / n)
                n_samples += n
            bounds.append(n_samples)
        t = np.concatenate(ts)[:, None]
        self.sample_rows = np.concatenate(starts)[:, None].astype(np.intp) + np.arange(4)  # (N, 4)
        self.weights = np.hstack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])
        self.stroke_ends = np.array(bounds[:-1], dtype=np.intp)  # split points of the samples


def _draw(
    glyph: _Glyph, rng: np.random.Generator, image_size: int, rotation: float | None
) -> np.ndarray:
    """One random drawing of a prepared glyph: uint8 (image_size, image_size)."""
    n, ns = glyph.n_points, glyph.n_strokes
    pts = glyph.points.copy()

    # Per-stroke jitter: move each on-curve point together with its neighbouring handles (smooth
    # joins between segments stay smooth), then a smaller independent wobble of every handle.
    pts[:n] += rng.normal(0.0, _NODE_JITTER, size=(glyph.n_nodes, 2))[glyph.node_of]
    pts[glyph.handles] += rng.normal(0.0, _HANDLE_JITTER, size=(len(glyph.handles), 2))
    # Then rotate each stroke a little about its centroid and shift it.
    cx = np.bincount(glyph.stroke_of, pts[:n, 0], ns) / glyph.counts
    cy = np.bincount(glyph.stroke_of, pts[:n, 1], ns) / glyph.counts
    centre = np.stack([cx, cy], axis=1)[glyph.stroke_of]
    a = rng.normal(0.0, _STROKE_ROT, size=ns)[glyph.stroke_of]
    d = pts[:n] - centre
    cos, sin = np.cos(a), np.sin(a)
    pts[:n, 0] = centre[:, 0] + cos * d[:, 0] - sin * d[:, 1]
    pts[:n, 1] = centre[:, 1] + sin * d[:, 0] + cos * d[:, 1]
    pts[:n] += rng.normal(0.0, _STROKE_SHIFT, size=(ns, 2))[glyph.stroke_of]

    # Flatten every stroke's Bézier chain at once: (N, 4) weights x (N, 4, 2) control points.
    samples = np.einsum("nj,njd->nd", glyph.weights, pts[glyph.sample_rows])

    # Global affine about the box centre: rotation @ slant @ (anisotropic) scale, then a shift.
    scale = rng.uniform(*_SCALE)
    aspect = math.exp(rng.uniform(-_ASPECT, _ASPECT))
    shear = rng.uniform(-_SHEAR, _SHEAR)
    # Screen y points down, so a counter-clockwise rotation on screen is a negative angle here.
    angle = -math.radians(rotation) if rotation is not None else rng.uniform(-_ROTATION, _ROTATION)
    c, s = math.cos(angle), math.sin(angle)
    mat = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    mat = mat @ np.diag([scale * aspect, scale / aspect])
    shift = rng.uniform(-_SHIFT, _SHIFT, size=2)
    pen = rng.uniform(*_PEN)
    mid_box = _BOX / 2
    samples = (samples - mid_box) @ mat.T + mid_box + shift

    # Keep the ink inside the frame: shrink (about the ink's centre) only if it does not fit,
    # then push it back inside. Random placement survives, clipping never happens.
    lo, hi = samples.min(axis=0), samples.max(axis=0)
    inset = pen / 2 + _MARGIN_PX * _BOX / image_size
    f = min(1.0, (_BOX - 2 * inset) / max(float((hi - lo).max()), 1e-9))
    mid = (lo + hi) / 2
    lo, hi = mid + (lo - mid) * f, mid + (hi - mid) * f
    move = np.maximum(0.0, inset - lo) - np.maximum(0.0, hi - (_BOX - inset))

    # Draw at `ss` times the resolution and box-filter down: cheap, good antialiasing.
    ss = 4 if image_size <= 64 else 2
    side = image_size * ss
    k = side / _BOX
    # PIL's pixel (i, j) covers [i, i+1) x [j, j+1), hence the half-pixel offset.
    xy = ((samples - mid) * f + mid + move) * k - 0.5
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    width = max(1, int(round(pen * k)))
    r = width / 2 - 0.5  # PIL ellipse boxes include their last row/column
    for q in np.split(xy, glyph.stroke_ends):
        if len(q) > 1:
            draw.line(q.ravel().tolist(), fill=255, width=width)
        # PIL draws wide lines as separate rectangles: a disc at every vertex gives round joins
        # and round caps (cheaper than PIL's joint="curve").
        for x, y in q.tolist():
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(img.reduce(ss), dtype=np.uint8)


def render_glyph(
    strokes: Sequence[np.ndarray],
    rng: np.random.Generator,
    image_size: int = 28,
    rotation: float | None = None,
) -> np.ndarray:
    """Draw one random "handwritten" instance of a glyph.

    Args:
        strokes: Bézier chains (each (3K+1, 2)) in KanjiVG's 109x109 viewBox, as from
            :func:`load_strokes`.
        rng: source of all randomness for this drawing.
        image_size: output side in pixels.
        rotation: global rotation in degrees (counter-clockwise on screen); random when None.
            Given explicitly (e.g. for a rotation-regression task), the glyph may be shrunk to fit.

    Returns:
        uint8 array (image_size, image_size): 0 background, up to 255 ink.
    """
    return _draw(_Glyph(strokes, image_size), rng, image_size, rotation)


def _instance_rng(seed: int, codepoint: int, index: int) -> np.random.Generator:
    # The only source of randomness for one drawing: independent of order, workers, other classes.
    return np.random.default_rng(np.random.SeedSequence([seed, codepoint, index, 0x6B616E6A]))


def _render_class(
    codepoint: int, instances: int, image_size: int, seed: int, folder: str
) -> np.ndarray:
    """All instances of one character: uint8 (instances, image_size, image_size)."""
    glyph = _Glyph(_load_strokes_cached(codepoint, folder), image_size)
    out = np.empty((instances, image_size, image_size), dtype=np.uint8)
    for i in range(instances):
        out[i] = _draw(glyph, _instance_rng(seed, codepoint, i), image_size, None)
    return out


def _render_chunk(job: tuple[int, list[int], int, int, int, str]) -> tuple[int, np.ndarray]:
    """Worker entry point: (first row, codepoints, ...) -> (first row, uint8 (n, inst, S, S))."""
    first, codes, instances, image_size, seed, folder = job
    arr = np.empty((len(codes), instances, image_size, image_size), dtype=np.uint8)
    for j, cp in enumerate(codes):
        arr[j] = _render_class(cp, instances, image_size, seed, folder)
    return first, arr


# ---------------------------------------------------------------------------------------------
# Splits, cache, public entry point
# ---------------------------------------------------------------------------------------------


def _normalize_splits(split_classes: Mapping[str, int]) -> dict[str, int]:
    splits = {str(k): int(v) for k, v in split_classes.items()}
    for name, n in splits.items():
        if n < 0:
            raise ValueError(f"split {name!r} asks for {n} classes; must be >= 0")
    return splits


def split_codepoints(split_classes: Mapping[str, int], seed: int = 0) -> dict[str, list[int]]:
    """Assign characters to class-disjoint splits.

    A seeded permutation of all available characters is cut in the order of ``split_classes``:
    the first ``split_classes[first_name]`` characters go to the first split, and so on.

    Returns ``{split_name: [code point, ...]}`` (class index order within each split).
    """
    splits = _normalize_splits(split_classes)
    codes = available_codepoints()
    total = sum(splits.values())
    if total > len(codes):
        sizes = ", ".join(f"{k}={v}" for k, v in splits.items())
        raise ValueError(
            f"requested {total} kanji classes ({sizes}) but kanjivg {kanjivg_version()} "
            f"has only {len(codes)} characters"
        )
    order = np.random.default_rng(seed).permutation(len(codes))
    out: dict[str, list[int]] = {}
    pos = 0
    for name, n in splits.items():
        out[name] = [codes[j] for j in order[pos : pos + n]]
        pos += n
    return out


def _cache_key(splits: dict[str, int], instances: int, image_size: int, seed: int) -> str:
    # Everything that changes the output; split order matters (it decides the assignment).
    return json.dumps(
        {
            "renderer": RENDERER_VERSION,
            "kanjivg": kanjivg_version(),
            "splits": [[k, v] for k, v in splits.items()],
            "instances": instances,
            "image_size": image_size,
            "seed": seed,
        },
        separators=(",", ":"),
    )


def cache_path(
    split_classes: Mapping[str, int],
    instances: int,
    image_size: int = 28,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where :func:`load_kanji` caches the arrays for these parameters."""
    key = _cache_key(_normalize_splits(split_classes), int(instances), int(image_size), int(seed))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"kanji-v{RENDERER_VERSION}-{digest}.npz"


def _checksum(arrays: Iterable[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).ravel(), crc)
    return crc


def _read_cache(
    path: Path, key: str, codes: dict[str, list[int]], instances: int, size: int
) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, unreadable or does not match."""
    if not path.is_file():
        return None
    expected = {"key", "checksum"} | {f"{p}{j}" for j in range(len(codes)) for p in "xc"}
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is truncated.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            if set(f.files) != expected or str(f["key"][()]) != key:
                return None
            out = {}
            for j, (name, cps) in enumerate(codes.items()):
                x, c = f[f"x{j}"], f[f"c{j}"]
                if x.dtype != np.uint8 or x.shape != (len(cps), instances, 1, size, size):
                    return None
                if c.tolist() != cps:
                    return None
                out[name] = x
            if int(f["checksum"][()]) != _checksum(out.values()):
                return None
            return out
    except Exception:  # truncated zip, bad header, bad array data...: any failure means rebuild
        return None


def _write_cache(
    path: Path, key: str, codes: dict[str, list[int]], arrays: dict[str, np.ndarray]
) -> None:
    checksum = np.array(_checksum(arrays.values()), dtype=np.int64)
    payload = {"key": np.array(key), "checksum": checksum}
    for j, name in enumerate(codes):
        payload[f"x{j}"] = arrays[name]
        payload[f"c{j}"] = np.array(codes[name], dtype=np.int64)
    save_npz_atomic(path, payload)


def _pool_context():
    # fork starts workers instantly and the workers only use numpy/PIL (never torch or CUDA);
    # elsewhere fall back to the platform default.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _build(
    codes: dict[str, list[int]],
    instances: int,
    image_size: int,
    seed: int,
    workers: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Render every split: {name: uint8 (classes, instances, 1, S, S)}, same order as `codes`."""
    allcodes = [cp for cps in codes.values() for cp in cps]
    images = np.empty((len(allcodes), instances, 1, image_size, image_size), dtype=np.uint8)
    folder = str(kanjivg_dir())
    bar = tqdm(total=len(allcodes), desc="rendering kanji", unit="class", disable=not progress,
               file=sys.stderr)
    with bar:
        if workers <= 1 or len(allcodes) <= 1:
            for j, cp in enumerate(allcodes):
                images[j, :, 0] = _render_class(cp, instances, image_size, seed, folder)
                bar.update(1)
        else:
            # Several chunks per worker so that uneven glyph complexity balances out.
            n_chunks = min(len(allcodes), workers * 8)
            bounds = np.linspace(0, len(allcodes), n_chunks + 1).astype(int)
            jobs = [
                (int(a), allcodes[a:b], instances, image_size, seed, folder)
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
            with concurrent.futures.ProcessPoolExecutor(
                max_workers=min(workers, n_chunks), mp_context=_pool_context()
            ) as pool:
                for first, arr in pool.map(_render_chunk, jobs):
                    images[first : first + len(arr), :, 0] = arr
                    bar.update(len(arr))
    out, pos = {}, 0
    for name, cps in codes.items():
        out[name] = images[pos : pos + len(cps)]
        pos += len(cps)
    return out


def load_kanji(
    split_classes: Mapping[str, int],
    instances: int,
    image_size: int = 28,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Build (or load from cache) the kanji few-shot data set.

    Args:
        split_classes: classes per split, e.g. ``{"train": 700, "val": 100, "test": 200}``; the
            splits are class-disjoint and cut from one seeded permutation in this order
            (see :func:`split_codepoints`).
        instances: random drawings per class.
        image_size: output image side in pixels.
        seed: decides the split assignment and every drawing.
        cache_dir: folder of the ``.npz`` cache; None means :func:`default_cache_dir`.
        workers: rendering processes; None means ``os.cpu_count()``, 1 renders in-process.
            The result does not depend on it.
        progress: show a tqdm bar on stderr while rendering.

    Returns:
        ``{split_name: uint8 tensor (num_classes, instances, 1, image_size, image_size)}``, ink
        bright (up to 255) on a 0 background; ``x.float() / 255`` is the network input. Class ``k``
        of a split is the character ``split_codepoints(split_classes, seed)[split_name][k]``.

    Raises:
        ValueError: more classes requested than KanjiVG has characters, or bad sizes.
    """
    instances, image_size, seed = int(instances), int(image_size), int(seed)
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    splits = _normalize_splits(split_classes)
    codes = split_codepoints(splits, seed)
    key = _cache_key(splits, instances, image_size, seed)
    path = cache_path(splits, instances, image_size, seed, cache_dir)

    n_workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    arrays = load_or_build(path, lambda: _read_cache(path, key, codes, instances, image_size),
                           lambda: _build(codes, instances, image_size, seed, n_workers, progress),
                           lambda built: _write_cache(path, key, codes, built), "kanji")
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


def kanji_dataset(split_classes: Mapping[str, int], instances: int, image_size: int = 28, seed: int = 0,
                  cache_dir: str | None = None, workers: int | None = None) -> "FewShotDataset":
    """The embedded default as a FewShotDataset (what `dataset=kanji` instantiates)."""
    from simt.data import FewShotDataset

    splits = load_kanji(dict(split_classes), instances, image_size=image_size, seed=seed,
                        cache_dir=cache_dir, workers=workers, progress=sys.stderr.isatty())
    return FewShotDataset.from_tensors(splits, name="kanji")
