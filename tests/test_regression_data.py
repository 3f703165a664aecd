"""Tests of the regression data (simt/data/regression.py): pickle loaders, restricted unpickler,
angular metrics and the embedded kanji_pose data set."""

import importlib
import math
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures_regression as FX

R = importlib.import_module("simt.data.regression")

POSE_SPLITS = {"train": 3, "val": 2, "test": 2}
POSE_SAMPLES = 8
POSE_SIZE = 40


def _one_line_naming(exc_info, path) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert os.fspath(path) in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Loaders on format-exact fixtures
# ---------------------------------------------------------------------------------------------


def _check_split(split, images, fraction):
    objects, samples = fraction.shape
    assert isinstance(split, R.RegressionSplit)
    assert split.images.dtype == np.uint8 and split.images.shape == (objects * samples, 128, 128, 1)
    assert split.offsets.dtype == np.int64
    assert split.offsets.tolist() == [k * samples for k in range(objects + 1)]
    assert split.num_objects == objects and split.samples_per_object().tolist() == [samples] * objects
    assert split.object_ids.tolist() == list(range(objects))
    np.testing.assert_array_equal(split.images, images.reshape(-1, 128, 128, 1))
    for k in range(objects):  # object k is contiguous
        np.testing.assert_array_equal(split.object(k)[0], images[k])


@pytest.mark.parametrize("layout,protocol", [("array", 4), ("array", 5), ("stacks", 2), ("lists", 0), ("py2", 2)])
def test_shapenet1d_loads_every_layout(tmp_path, layout, protocol):
    truth = FX.write_shapenet1d(tmp_path, layout=layout, protocol=protocol, label_columns=2)
    data = R.load_shapenet1d(tmp_path / "ShapeNet1D")
    assert list(data) == ["train", "val", "test"]
    for name, (images, fraction) in truth.items():
        split = data[name]
        _check_split(split, images, fraction)
        assert split.targets.dtype == np.float32 and split.targets.shape == (fraction.size, 2)
        angle = 2 * np.pi * fraction.reshape(-1)
        np.testing.assert_allclose(split.targets, np.stack([np.cos(angle), np.sin(angle)], 1), atol=2e-6)
        # Exactly the official float32 arithmetic: label.astype(float32) * 2 * pi, then cos / sin.
        a32 = fraction.reshape(-1).astype(np.float32) * 2 * np.pi
        np.testing.assert_array_equal(split.targets, np.stack([np.cos(a32), np.sin(a32)], 1))


@pytest.mark.parametrize("layout,squeeze", [("lists", True), ("py2", True), ("array", False), ("stacks", True)])
def test_pascal1d_loads_and_test_is_val(tmp_path, layout, squeeze):
    truth = FX.write_pascal1d(tmp_path, layout=layout, squeeze_channel=squeeze)
    data = R.load_pascal1d(tmp_path / "Pascal1D", splits=("train", "val", "test"))
    assert data["test"] is data["val"]  # the official code meta-tests on the validation file
    for name, (images, fraction) in truth.items():
        split = data[name]
        _check_split(split, images, fraction)
        assert split.targets.dtype == np.float32 and split.targets.shape == (fraction.size, 1)
        np.testing.assert_array_equal(split.targets[:, 0], fraction.reshape(-1).astype(np.float32) * 10.0)
        assert 0.0 <= split.targets.min() and split.targets.max() < 10.0


def test_default_splits_and_data_size(tmp_path):
    FX.write_pascal1d(tmp_path)
    assert list(R.load_pascal1d(tmp_path / "Pascal1D")) == ["train", "val"]
    FX.write_shapenet1d(tmp_path, objects={"val": 2})
    assert list(R.load_shapenet1d(tmp_path / "ShapeNet1D", splits=["val"])) == ["val"]
    with pytest.raises(ValueError, match="unknown split"):
        R.load_shapenet1d(tmp_path / "ShapeNet1D", splits=["dev"])
    small = tmp_path / "ShapeNet1D" / "train_data_small.pkl"
    images, fraction = FX.make_objects(2, 3)
    FX.write_pair(small, images, fraction[..., None])
    split = R.load_shapenet1d(tmp_path / "ShapeNet1D", splits=["train"], data_size="small")["train"]
    assert split.num_objects == 2


def test_ragged_objects_and_float_pixels(tmp_path):
    """Objects may hold different numbers of samples; 0..255 pixels in another dtype are converted."""
    a, fa = FX.make_objects(1, 4, seed=1)
    b, fb = FX.make_objects(1, 2, seed=2)
    path = tmp_path / "Pascal1D" / "train_data_ins.pkl"
    path.parent.mkdir()
    with open(path, "wb") as fh:
        pickle.dump(([a[0].astype(np.float32), b[0]], [fa[0][:, None], fb[0][:, None]]), fh)
    split = R.load_pascal1d(tmp_path / "Pascal1D", splits=["train"])["train"]
    assert split.offsets.tolist() == [0, 4, 6]
    np.testing.assert_array_equal(split.images, np.concatenate([a[0], b[0]]))


# ---------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["builtins.exec", "posix.system", "builtins.getattr", "numpy.savetxt"])
@pytest.mark.parametrize("nested", [False, True])
def test_crafted_pickle_is_rejected_and_never_runs(tmp_path, kind, nested):
    marker = tmp_path / "pwned"
    bad = FX.write_malicious_pickle(tmp_path / "Pascal1D" / "train_data_ins.pkl", marker, kind, nested=nested)
    with pytest.raises(R.DataError) as info:
        R.safe_load_pickle(bad)
    msg = _one_line_naming(info, bad)
    assert kind in msg
    with pytest.raises(R.DataError) as info:
        R.load_pascal1d(tmp_path / "Pascal1D", splits=["train"])
    assert kind in _one_line_naming(info, bad)
    assert not marker.exists()


def test_crafted_pickle_is_a_real_payload(tmp_path):
    """Positive control: plain pickle.load does run the payloads the test above rejects."""
    for kind in ("builtins.exec", "numpy.savetxt"):
        marker = tmp_path / f"ran-{kind}"
        bad = FX.write_malicious_pickle(tmp_path / f"{kind}.pkl", marker, kind)
        with open(bad, "rb") as fh:
            pickle.load(fh)
        assert marker.exists()


def test_safe_load_accepts_arrays_scalars_and_containers(tmp_path):
    obj = {"a": [np.arange(5, dtype=np.int16), (1.5, "s", b"raw")], "b": {np.float64(2.5), 3},
           "c": np.zeros((2, 3), dtype=">f4"), "d": np.array([[1, 2]], dtype=np.uint8).T, "e": bytearray(b"xy")}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        back, ref = R.safe_load_pickle(path), pickle.loads(path.read_bytes())
        assert back.keys() == obj.keys() and back["b"] == obj["b"] and back["e"] == obj["e"]
        np.testing.assert_array_equal(back["a"][0], obj["a"][0])
        assert back["a"][1] == obj["a"][1]
        assert back["c"].dtype == ref["c"].dtype and np.array_equal(back["c"], obj["c"])
        assert np.array_equal(back["d"], obj["d"])


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(R.DataError) as info:
        R.safe_load_pickle(path)
    _one_line_naming(info, path)


# ---------------------------------------------------------------------------------------------
# Bad input: one-line DataError naming the file
# ---------------------------------------------------------------------------------------------


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(R.DataError) as info:
        R.load_shapenet1d(tmp_path / "ShapeNet1D")
    assert "train_data_large.pkl" in _one_line_naming(info, tmp_path / "ShapeNet1D")
    FX.write_pascal1d(tmp_path, objects={"train": 2})
    with pytest.raises(R.DataError) as info:
        R.load_pascal1d(tmp_path / "Pascal1D")
    assert "missing file" in _one_line_naming(info, tmp_path / "Pascal1D" / "val_data_ins.pkl")
    with pytest.raises(R.DataError) as info:
        R.safe_load_pickle(tmp_path)  # a folder
    _one_line_naming(info, tmp_path)


def test_truncated_and_garbage_pickles(tmp_path):
    FX.write_shapenet1d(tmp_path, objects={"train": 2, "val": 2, "test": 2})
    path = tmp_path / "ShapeNet1D" / "val_data.pkl"
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(R.DataError) as info:
            R.load_shapenet1d(tmp_path / "ShapeNet1D")
        _one_line_naming(info, path)
    path.write_bytes(b"PK\x03\x04 this is a zip, not a pickle\n" * 3)
    with pytest.raises(R.DataError) as info:
        R.load_shapenet1d(tmp_path / "ShapeNet1D")
    _one_line_naming(info, path)


def _bad_pairs():
    images, fraction = FX.make_objects(2, 3)
    labels = fraction[..., None]
    yield "not a pair", {"images": images, "labels": labels}, "pair"
    yield "triple", (images, labels, labels), "pair"
    yield "small images", (images[:, :, :64, :64], labels), "128x128"
    yield "rgb images", (np.repeat(images, 3, axis=-1), labels), "grey"
    yield "3-d images", (images[:, :, :, :, 0].reshape(2, 3, -1), labels), "images"
    yield "bool images", (images > 0, labels), "uint8"
    yield "out-of-range pixels", (images.astype(np.int16) * 2, labels), "[0, 255]"
    yield "2-d labels", (images, fraction), "labels"
    yield "too few objects", (images, labels[:1]), "do not match"
    yield "too few samples", (images, labels[:, :2]), "do not match"
    yield "list labels short", (list(images), [labels[0], labels[1][:2]]), "2 labels"
    yield "ragged label rows", (list(images), [[[0.1], [0.2, 0.3], [0.4]], labels[1]]), "labels"
    yield "string labels", (images, np.full((2, 3, 1), "x")), "numeric"
    yield "degrees", (images, labels * 360.0), "fraction of a turn"
    yield "nan labels", (images, labels * np.nan), "NaN"
    yield "no objects", ([], []), "no objects"
    yield "images a dict", ({"a": 1}, labels), "images"
    yield "mixed sizes", ([images[0], images[1][:, :64, :64]], list(labels)), "128x128"


@pytest.mark.parametrize("name,obj,expect", list(_bad_pairs()), ids=[b[0] for b in _bad_pairs()])
def test_malformed_contents(tmp_path, name, obj, expect):
    path = tmp_path / "ShapeNet1D" / "test_data.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(R.DataError) as info:
        R.load_shapenet1d(tmp_path / "ShapeNet1D", splits=["test"])
    assert expect in _one_line_naming(info, path)


def test_foreign_object_in_pickle(tmp_path):
    path = tmp_path / "Pascal1D" / "val_data_ins.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps((zipfile.ZipInfo("x"), [])))
    with pytest.raises(R.DataError) as info:
        R.load_pascal1d(tmp_path / "Pascal1D", splits=["val"])
    assert "zipfile.ZipInfo" in _one_line_naming(info, path)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _cs(degrees, scale=1.0):
    r = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    return torch.stack([torch.cos(r), torch.sin(r)], dim=-1) * scale


def test_angular_error_known_angles_and_wrap():
    pred = _cs([350.0, 0.0, 90.0, -170.0, 45.0, 359.0, 180.0, 10.0])
    target = _cs([10.0, 180.0, 90.0, 170.0, 225.0, 1.0, -180.0, 350.0])
    expect = torch.tensor([20.0, 180.0, 0.0, 20.0, 180.0, 2.0, 0.0, 20.0], dtype=torch.float64)
    got = R.angular_error_degrees(pred, target)
    assert got.shape == (8,) and got.dtype == torch.float64
    torch.testing.assert_close(got, expect, atol=1e-9, rtol=0)
    # float32 in, float32 out; the length of the vectors does not matter (atan2)
    got32 = R.angular_error_degrees(_cs([350.0, 30.0], 0.3).float(), _cs([10.0, 100.0]).float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, torch.tensor([20.0, 70.0]), atol=1e-4, rtol=0)
    # random pairs: always in [0, 180] and symmetric
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    e = R.angular_error_degrees(a, b)
    assert e.min() >= 0 and e.max() <= 180
    torch.testing.assert_close(e, R.angular_error_degrees(b, a))
    with pytest.raises(ValueError):
        R.angular_error_degrees(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError):
        R.angular_error_degrees(torch.zeros(3, 2), torch.zeros(4, 2))


def test_metric_functions():
    pred, target = _cs([350.0, 0.0]).float(), _cs([10.0, 180.0]).float()
    assert R.angular_error.__name__ == "angular_error" and R.mse.__name__ == "mse"
    assert R.angular_error.higher_is_better is False and R.mse.higher_is_better is False
    value = R.angular_error(pred, target)
    assert isinstance(value, float) and math.isclose(value, 100.0, abs_tol=1e-3)
    out, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [5.0]])
    assert R.mse(out, y) == pytest.approx(2.5) and isinstance(R.mse(out, y), float)
    with pytest.raises(ValueError):
        R.mse(out, y[:, 0])
    with pytest.raises(ValueError, match=r"\(\.\.\., N, D\)"):  # one episode is (N, D): a vector is refused
        R.mse(out[:, 0], y[:, 0])
    out2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    loss = R.azimuth_loss(out2, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert loss.item() == pytest.approx(1.0)  # (1 + 1) / 2 samples
    loss.backward()
    assert out2.grad is not None


# ---------------------------------------------------------------------------------------------
# kanji_pose
# ---------------------------------------------------------------------------------------------


def _pose(cache_dir, **kw):
    args = dict(samples_per_object=POSE_SAMPLES, image_size=POSE_SIZE, seed=0, cache_dir=cache_dir, workers=1,
                progress=False)
    args.update(kw)
    return R.kanji_pose(args.pop("split_classes", POSE_SPLITS), **args)


@pytest.fixture(scope="module")
def pose(tmp_path_factory):
    return _pose(tmp_path_factory.mktemp("pose-cache"))


def _same(a, b):
    return a.keys() == b.keys() and all(
        np.array_equal(a[k].images, b[k].images) and np.array_equal(a[k].targets, b[k].targets)
        and np.array_equal(a[k].offsets, b[k].offsets) and np.array_equal(a[k].object_ids, b[k].object_ids)
        for k in a)


def test_pose_shapes_and_targets(pose):
    assert list(pose) == list(POSE_SPLITS)
    for name, n in POSE_SPLITS.items():
        s = pose[name]
        assert s.images.dtype == np.uint8 and s.images.shape == (n * POSE_SAMPLES, POSE_SIZE, POSE_SIZE, 1)
        assert s.targets.dtype == np.float32 and s.targets.shape == (n * POSE_SAMPLES, 1)
        assert s.offsets.tolist() == list(range(0, n * POSE_SAMPLES + 1, POSE_SAMPLES))
        assert 0.0 <= s.targets.min() and s.targets.max() < 10.0
        assert (s.images.reshape(len(s.images), -1).max(axis=1) > 128).all()  # every sample has ink
        for k in range(n):
            t = np.sort(s.object(k)[1][:, 0])
            # stratified angles: the samples spread over the whole turn
            gaps = np.diff(np.concatenate([t, t[:1] + 10.0]))
            assert gaps.max() < 2 * 10.0 / POSE_SAMPLES + 1e-5


def test_pose_class_disjoint_and_not_symmetric(pose):
    ids = [set(s.object_ids.tolist()) for s in pose.values()]
    assert all(len(i) == n for i, n in zip(ids, POSE_SPLITS.values()))
    assert not set.intersection(*ids[:2]) and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert R._rotation_symmetric(0x53E3) and R._rotation_symmetric(0x7530)  # 口, 田
    assert not R._rotation_symmetric(0x6C38) and not R._rotation_symmetric(0x66F8)  # 永, 書
    assert not any(R._rotation_symmetric(c) for i in ids for c in i)


def test_pose_skips_symmetric_glyphs(monkeypatch):
    codes = R._pose_codepoints({"train": 3, "val": 1}, 0)
    monkeypatch.setattr(R, "_SYMMETRIC", frozenset(chr(codes["train"][1])))
    skipped = R._pose_codepoints({"train": 3, "val": 1}, 0)
    assert skipped["train"] == [codes["train"][0], codes["train"][2], codes["val"][0]]
    assert skipped["val"] != codes["val"] and skipped["val"][0] not in codes["train"]


def test_pose_renderer_equals_render_glyph():
    """The prepared-glyph shortcut draws exactly what the public render_glyph draws."""
    from simt.data import kanji

    strokes = kanji.load_strokes(0x6C38)
    fast = R._glyph_renderer(strokes, POSE_SIZE)
    for angle in (0.0, 37.5, 200.0):
        a = fast(np.random.default_rng(5), angle)
        b = kanji.render_glyph(strokes, np.random.default_rng(5), POSE_SIZE, rotation=angle)
        np.testing.assert_array_equal(a, b)


def test_pose_deterministic_per_seed_and_workers(pose, tmp_path):
    assert _same(pose, _pose(tmp_path / "a", workers=2))
    other = _pose(tmp_path / "b", seed=1)
    assert not np.array_equal(other["train"].object_ids, pose["train"].object_ids)


def _corr(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _centroid(img):
    w = img[..., 0].astype(np.float64)
    ys, xs = np.indices(w.shape)
    return (xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()


def _rotate_onto(img, degrees, other):
    """``img`` rotated counter-clockwise on screen (as the renderer's angles) about its ink centroid,
    moved so that the centroid lands on ``other``'s: the renderer's random shift and fit-to-frame
    push are not rotations, so compare shapes about their centroids."""
    (cx, cy), (ox, oy) = _centroid(img), _centroid(other)
    return np.asarray(Image.fromarray(img[..., 0]).rotate(degrees, resample=Image.BILINEAR, center=(cx, cy),
                                                          translate=(ox - cx, oy - cy)))


def test_pose_targets_match_the_rotation(pose):
    """Rotating sample i by 36 * (t_j - t_i) degrees makes it look like sample j of the same object."""
    hits = total = 0
    for s in pose.values():
        for k in range(s.num_objects):
            images, targets = s.object(k)
            for j in range(1, len(images)):
                delta = 36.0 * float(targets[j, 0] - targets[0, 0])
                candidates = np.arange(0.0, 360.0, 10.0)
                scores = [_corr(_rotate_onto(images[0], delta + c, images[j]), images[j][..., 0]) for c in candidates]
                best = candidates[int(np.argmax(scores))]
                hits += min(best, 360.0 - best) <= 10.0
                total += 1
    assert hits / total >= 0.9, f"{hits}/{total}"


def test_pose_cache_reused_and_corrupt_cache_rebuilt(pose, tmp_path, monkeypatch):
    first = _pose(tmp_path)
    path = R.kanji_pose_cache_path(POSE_SPLITS, POSE_SAMPLES, POSE_SIZE, 0, tmp_path)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert _same(first, pose)

    def no_render(*a, **k):
        raise AssertionError("rendered despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(R, "_build_pose", no_render)
        assert _same(_pose(tmp_path), pose)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    assert _same(_pose(tmp_path), pose)
    with zipfile.ZipFile(path, "a") as z:  # an extra member: does not match the expected layout
        z.writestr("junk.npy", b"junk")
    assert _same(_pose(tmp_path), pose)
    monkeypatch.setenv("SIMT_CACHE", str(tmp_path / "env"))
    assert R.kanji_pose_cache_path(POSE_SPLITS, POSE_SAMPLES, POSE_SIZE, 0).parent == tmp_path / "env"


def test_pose_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="samples_per_object"):
        _pose(tmp_path, samples_per_object=1)
    with pytest.raises(ValueError, match="objects"):
        _pose(tmp_path, split_classes={"train": 0})
    with pytest.raises(ValueError, match="fewer usable"):
        _pose(tmp_path, split_classes={"train": 10**6})
