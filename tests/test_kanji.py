"""Tests of the embedded KanjiVG few-shot data set (simt/data/kanji.py)."""

import importlib
import os
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# Import the module itself: `simt.data` may also define a callable named `kanji`.
K = importlib.import_module("simt.data.kanji")

SMALL = {"train": 6, "val": 3, "test": 3}
INST = 4


def _build(cache_dir, **kw):
    args = dict(instances=INST, seed=0, cache_dir=cache_dir, workers=1, progress=False)
    args.update(kw)
    split_classes = args.pop("split_classes", SMALL)
    return K.load_kanji(split_classes, **args)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The SMALL data set built once, and the folder it was cached in."""
    folder = tmp_path_factory.mktemp("kanji_cache")
    return _build(folder), folder


# --------------------------------------------------------------------------- path parser


def test_parse_absolute_relative_and_implicit_lines():
    absolute = K.parse_path("M10,20 L30,20 40,30")
    relative = K.parse_path("m10,20 l20,0 10,10")
    implicit = K.parse_path("M10 20 30 20 40 30")  # pairs after M are implicit line-tos
    for chains in (absolute, relative, implicit):
        assert len(chains) == 1
        chain = chains[0]
        assert chain.shape == (7, 2)  # start + 2 segments x (ctrl, ctrl, end)
        np.testing.assert_allclose(chain[[0, 3, 6]], [[10, 20], [30, 20], [40, 30]])
        # Lines become cubics with controls at thirds.
        np.testing.assert_allclose(chain[1], [10 + 20 / 3, 20])


def test_parse_implicit_repeated_curves_and_number_syntax():
    (chain,) = K.parse_path("M0,0c1,1 2,2 3,3 1,1 2,2 3,3")
    np.testing.assert_allclose(chain[[3, 6]], [[3, 3], [6, 6]])
    np.testing.assert_allclose(chain[4], [4, 4])  # second segment's controls are relative to (3,3)
    # Numbers run together: "-2.5" after "1.5", ".5.5" is 0.5 then 0.5, exponents.
    (chain,) = K.parse_path("M1.5-2.5l.5.5L1e1,2E-1")
    np.testing.assert_allclose(chain[[0, 3, 6]], [[1.5, -2.5], [2, -2], [10, 0.2]])


def test_parse_smooth_curve_reflection():
    absolute = K.parse_path("M0,0 C0,10 10,10 10,0 S20,-10 20,0")
    relative = K.parse_path("M0,0c0,10,10,10,10,0s10-10,10,0")
    for (chain,) in (absolute, relative):
        # S's first control is C's second control (10,10) reflected about the current point (10,0).
        np.testing.assert_allclose(chain[4], [10, -10])
        np.testing.assert_allclose(chain[5:7], [[20, -10], [20, 0]])
    # Repeated s reflects the previous s; s after a line starts at the current point.
    (chain,) = K.parse_path("M0,0 s5,5 10,0 5,5 10,0")
    np.testing.assert_allclose(chain[[1, 4]], [[0, 0], [15, -5]])
    (chain,) = K.parse_path("M0,0 L10,0 S20,10 30,0")
    np.testing.assert_allclose(chain[4], [10, 0])


def test_parse_hv_quadratic_close_and_subpaths():
    (chain,) = K.parse_path("M0,0 H10 v10 Z")
    np.testing.assert_allclose(chain[[0, 3, 6, 9]], [[0, 0], [10, 0], [10, 10], [0, 0]])
    (chain,) = K.parse_path("M0,0 Q10,10 20,0 T40,0")
    # Quadratic (0,0)-(10,10)-(20,0) as a cubic: controls at 2/3 towards the quadratic control.
    np.testing.assert_allclose(chain[1:4], [[20 / 3, 20 / 3], [40 / 3, 20 / 3], [20, 0]])
    # T reflects the control (10,10) about (20,0) to (30,-10).
    np.testing.assert_allclose(chain[4], [20 + 2 / 3 * 10, -2 / 3 * 10])
    chains = K.parse_path("M0,0 L1,1 M5,5 l1,1 z m2,0 l1,0")
    assert [c.shape[0] for c in chains] == [4, 7, 4]
    # m after z is relative to the closed subpath's start (5,5).
    np.testing.assert_allclose(chains[2][[0, 3]], [[7, 5], [8, 5]])
    (dot,) = K.parse_path("M3,4")
    assert dot.shape == (1, 2)


@pytest.mark.parametrize("bad", ["L1,2", "M0,0 C1,2", "M0,0 A1 1 0 0 1 2 2", "M0,0 L1,x"])
def test_parse_rejects_bad_path_data(bad):
    with pytest.raises(ValueError):
        K.parse_path(bad)


def test_flatten_and_real_kanjivg_stroke():
    (chain,) = K.parse_path("M0,0 L9,0")
    line = K.flatten_chain(chain, samples_per_segment=3)
    np.testing.assert_allclose(line, [[0, 0], [3, 0], [6, 0], [9, 0]])
    # 一 (U+4E00) is one stroke: M11,54.25 then three relative c segments.
    (stroke,) = K.load_strokes(0x4E00)
    np.testing.assert_allclose(stroke[0], [11, 54.25])
    np.testing.assert_allclose(stroke[-1], [11 + 9.73 + 68.58 + 7.57, 54.25 + 0.5 - 5.24 + 0.49])


# --------------------------------------------------------------------------- splits


def test_splits_are_class_disjoint_and_seeded():
    splits = K.split_codepoints(SMALL, seed=0)
    assert {k: len(v) for k, v in splits.items()} == SMALL
    all_codes = [c for v in splits.values() for c in v]
    assert len(set(all_codes)) == len(all_codes)
    assert set(all_codes) <= set(K.available_codepoints())
    assert K.split_codepoints(SMALL, seed=0) == splits
    assert K.split_codepoints(SMALL, seed=1) != splits
    # The splits are cut from one permutation: asking for fewer classes gives a prefix.
    assert K.split_codepoints({"train": 3}, seed=0)["train"] == splits["train"][:3]


def test_too_many_classes_is_a_one_line_error(tmp_path):
    n = len(K.available_codepoints())
    assert n > 6000
    with pytest.raises(ValueError) as err:
        K.load_kanji({"train": n, "val": 1}, 2, cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(n) in msg and str(n + 1) in msg
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- images


def test_shapes_ink_and_margin(small):
    data, _ = small
    assert list(data) == list(SMALL)
    for name, x in data.items():
        assert x.dtype == torch.uint8 and x.shape == (SMALL[name], INST, 1, 28, 28)
        flat = x.flatten(2)
        assert (flat.amax(-1) >= 200).all(), "every image has solid ink"
        ink = (flat > 0).float().mean(-1)
        assert (ink > 0.02).all() and (ink < 0.7).all(), "ink and background in every image"
        # The glyph stays inside the frame with a margin: the outer ring is empty.
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)
        assert border.max() == 0


def test_instances_vary_but_resemble_their_class(small):
    data, _ = small
    x = torch.cat(list(data.values())).float() / 255  # (C, I, 1, H, W)
    c, i = x.shape[:2]
    # Compare slightly blurred images: the jitter moves thin strokes by a pixel or so.
    blur = F.avg_pool2d(x.flatten(0, 1), 3, stride=1, padding=1).view(c, i, -1)
    within, between = [], []
    for a in range(c):
        for p in range(i):
            for q in range(p + 1, i):
                d = (blur[a, p] - blur[a, q]).norm()
                assert d > 0, "two instances of a class must differ"
                within.append(d)
        for b in range(a + 1, c):
            between.append((blur[a, 0] - blur[b, 0]).norm())
    assert torch.stack(within).mean() < 0.9 * torch.stack(between).mean()


def test_render_glyph_api():
    strokes = K.load_strokes(0x5B57)  # 字
    img = K.render_glyph(strokes, np.random.default_rng(0), 32)
    assert img.dtype == np.uint8 and img.shape == (32, 32) and img.max() > 200 and img[0].max() == 0
    again = K.render_glyph(strokes, np.random.default_rng(0), 32)
    assert np.array_equal(img, again)


# --------------------------------------------------------------------------- determinism


def test_deterministic_per_seed_and_independent_of_workers(small, tmp_path):
    data, _ = small
    assert _equal(_build(tmp_path / "a"), data)  # a fresh build elsewhere is bitwise equal
    parallel = _build(tmp_path / "b", workers=2)
    assert _equal(parallel, data)
    other_seed = _build(tmp_path / "c", seed=1)
    assert not torch.equal(other_seed["train"], data["train"])


def test_instances_do_not_depend_on_other_classes(small, tmp_path):
    data, _ = small
    # Same seed, so the same first 6 characters land in "train"; nothing else was requested.
    alone = _build(tmp_path, split_classes={"train": 6})
    assert torch.equal(alone["train"], data["train"])
    fewer = _build(tmp_path, split_classes={"train": 6}, instances=2)
    assert torch.equal(fewer["train"], data["train"][:, :2])


# --------------------------------------------------------------------------- cache


def test_cache_is_reused(small, monkeypatch):
    data, folder = small
    path = K.cache_path(SMALL, INST, 28, 0, folder)
    assert path.is_file() and path.parent == folder and path.name.startswith("kanji-v")
    mtime = path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rendered although the cache is valid")

    monkeypatch.setattr(K, "_render_class", boom)
    again = _build(folder)
    assert _equal(again, data)
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temp files left behind


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _wrong_contents(path):
    with path.open("wb") as fh:
        np.savez(fh, x0=np.zeros((1, 1), np.uint8))


def _flip_a_pixel(path):
    # A well-formed npz whose pixels no longer match the stored checksum.
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["x0"] = arrays["x0"].copy()
    arrays["x0"][0, 0, 0, 0, 0] ^= 1
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    "corrupt",
    [lambda p: p.write_bytes(os.urandom(2048)), _truncate, _wrong_contents, _flip_a_pixel],
    ids=["garbage", "truncated", "wrong-keys", "checksum"],
)
def test_corrupt_cache_is_rebuilt(small, tmp_path, monkeypatch, corrupt):
    data, folder = small
    src = K.cache_path(SMALL, INST, 28, 0, folder)
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes())
    corrupt(path)
    calls = []
    real = K._render_class
    monkeypatch.setattr(K, "_render_class", lambda *a: calls.append(a) or real(*a))
    assert _equal(_build(tmp_path), data)
    assert calls, "the corrupt cache was not rebuilt"
    assert zipfile.is_zipfile(path)
    calls.clear()
    assert _equal(_build(tmp_path), data) and not calls  # the rewritten cache is valid


def test_cache_location_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMT_CACHE", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert K.default_cache_dir() == tmp_path / "s"
    monkeypatch.delenv("SIMT_CACHE")
    assert K.default_cache_dir() == tmp_path / "x" / "simt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert K.default_cache_dir() == K.Path.home() / ".cache" / "simt"
    base = K.cache_path(SMALL, INST, 28, 0, tmp_path)
    variants = [
        K.cache_path(SMALL, INST + 1, 28, 0, tmp_path),
        K.cache_path(SMALL, INST, 32, 0, tmp_path),
        K.cache_path(SMALL, INST, 28, 1, tmp_path),
        K.cache_path({**SMALL, "test": 4}, INST, 28, 0, tmp_path),
        K.cache_path({"val": 3, "train": 6, "test": 3}, INST, 28, 0, tmp_path),  # order matters
    ]
    assert len({base, *variants}) == 6
    assert f"-v{K.RENDERER_VERSION}-" in base.name and base.suffix == ".npz"


def test_prints_nothing(tmp_path, capsys):
    _build(tmp_path, split_classes={"train": 2}, instances=1, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "rendering kanji" in err  # only the progress bar, on stderr
    _build(tmp_path / "quiet", split_classes={"train": 2}, instances=1, progress=False)
    assert capsys.readouterr() == ("", "")


def test_an_unwritable_cache_warns_and_still_returns_the_data(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="could not write the kanji cache"):
        data = _build(blocker / "cache")
    assert data["train"].shape[:2] == (SMALL["train"], INST)
