"""The classification loaders of simt.data.images on tiny format-exact fixtures of every layout."""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import h5py
import numpy as np
import pytest
from PIL import Image

from simt.data import images as im
from simt.data.images import DataError, ImageSplit, safe_load_pickle

import fixtures_images as fx

CLASSES = {"train": 3, "val": 2, "test": 2}
PER_CLASS = 4


def assert_split(split: ImageSplit, n_classes: int, per_class: int, colour_index: list[int], tol: float = 4.0):
    """Shapes, dtypes, offsets, and each class's images near its RGB colour (so grouped and RGB)."""
    assert split.images.dtype == np.uint8 and split.images.shape == (n_classes * per_class, 84, 84, 3)
    assert split.offsets.dtype == np.int64
    assert split.offsets.tolist() == [k * per_class for k in range(n_classes + 1)]
    assert len(split.class_names) == n_classes
    for k, g in enumerate(colour_index):
        means = split.class_images(k).reshape(per_class, -1, 3).mean(axis=1)
        assert np.abs(means - np.asarray(fx.class_colour(g))).max() < tol, (k, means, fx.class_colour(g))


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """Loads that pass no cache_dir must not touch the user's cache."""
    monkeypatch.setenv("SIMT_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------------
# Each layout
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["hdf5", "pickle", "pickle_py2", "pickle_l2l", "csv"])
def test_miniimagenet_layouts_agree(tmp_path, cache, writer):
    content = fx.miniimagenet_content(CLASSES, PER_CLASS)
    if writer == "hdf5":
        fx.write_miniimagenet_hdf5(tmp_path, CLASSES, PER_CLASS)
    elif writer == "csv":
        fx.write_miniimagenet_csv(tmp_path, CLASSES, PER_CLASS)
    else:
        fx.write_miniimagenet_pickle(tmp_path, CLASSES, PER_CLASS, py2=writer == "pickle_py2",
                                     val_name="validation" if writer == "pickle_l2l" else "val")
    data = im.load_miniimagenet(tmp_path / "miniimagenet", progress=False, cache_dir=cache)
    assert list(data) == ["train", "val", "test"]
    for split, c in content.items():
        s = data[split]
        assert_split(s, CLASSES[split], PER_CLASS, c["colour_index"])
        assert s.class_names == c["names"] == sorted(c["names"])
        # The three layouts of the same content give identical arrays.
        np.testing.assert_array_equal(np.asarray(s.images), c["images"])
        np.testing.assert_array_equal(s.offsets, c["offsets"])
    # Only the encoded layout is cached.
    assert bool(list(cache.glob("images/*.npy"))) == (writer == "csv")


def test_miniimagenet_layout_order(tmp_path, cache, monkeypatch):
    """With several layouts present, the pickle is preferred to the CSV (no decoding happens)."""
    fx.write_miniimagenet_csv(tmp_path, CLASSES, PER_CLASS)
    fx.write_miniimagenet_pickle(tmp_path, CLASSES, PER_CLASS)
    monkeypatch.setattr(im, "_decode_image", lambda *a: pytest.fail("decoded although a pickle exists"))
    data = im.load_miniimagenet(tmp_path / "miniimagenet", ["val"], progress=False, cache_dir=cache)
    assert list(data) == ["val"] and data["val"].num_classes == 2


def test_miniimagenet_csv_resizes(tmp_path, cache):
    root = tmp_path / "miniimagenet"
    (root / "images").mkdir(parents=True)
    for j, size in enumerate([(100, 90), (84, 84)]):
        Image.fromarray(fx.class_images(0, 1, size=size)[0]).save(root / "images" / f"a{j}.png")
    (root / "train.csv").write_text("filename,label\na0.png,n1\na1.png,n1\n")
    s = im.load_miniimagenet(root, "train", progress=False, cache_dir=cache)["train"]
    assert_split(s, 1, 2, [0])


@pytest.mark.parametrize("writer", ["hdf5", "npz_ren", "npz_metaoptnet", "png_pkl"])
def test_tieredimagenet_layouts(tmp_path, cache, writer):
    if writer == "hdf5":
        fx.write_tiered_hdf5(tmp_path, CLASSES, PER_CLASS)
    elif writer == "png_pkl":
        fx.write_tiered_png_pkl(tmp_path, CLASSES, PER_CLASS)
    else:
        fx.write_tiered_npz(tmp_path, CLASSES, PER_CLASS, labels_format=writer[4:])
    data = im.load_tieredimagenet(tmp_path / "tieredimagenet", progress=False, cache_dir=cache)
    content = fx.tiered_content(CLASSES, PER_CLASS)
    for split, c in content.items():
        s = data[split]
        assert_split(s, CLASSES[split], PER_CLASS, c["colour_index"])
        # PNG and BGR-flipped npz are lossless: exactly the written RGB images.
        np.testing.assert_array_equal(np.asarray(s.images), c["images"])
        if writer == "npz_metaoptnet":  # no names in that file: the label ids stand in
            assert s.class_names == [str(c["first"] + k) for k in range(CLASSES[split])]
        else:
            assert s.class_names == c["names"]


def test_tiered_npz_colour_order_can_be_kept(tmp_path, cache):
    fx.write_tiered_npz(tmp_path, CLASSES, PER_CLASS)
    s = im.load_tieredimagenet(tmp_path / "tieredimagenet", ["train"], progress=False, cache_dir=cache,
                               npz_bgr=False)["train"]
    np.testing.assert_array_equal(s.images, fx.tiered_content(CLASSES, PER_CLASS)["train"]["images"][..., ::-1])


def test_cub(tmp_path, cache):
    fx.write_cub_hdf5(tmp_path, CLASSES, PER_CLASS)
    data = im.load_cub(tmp_path / "cub", progress=False, cache_dir=cache)
    for split, first in [("train", 0), ("val", 3), ("test", 5)]:
        assert_split(data[split], CLASSES[split], PER_CLASS, list(range(first, first + CLASSES[split])))
        assert data[split].class_names[0].startswith(f"{first + 1:03d}.")
        assert isinstance(data[split].images, np.memmap)


def test_cub_resize_then_centre_crop():
    """Shorter side to 126, then the centre 84x84: a 100x300 (w x h) image of three horizontal bands
    becomes 126x378 and the crop (rows 147..231) lies inside the middle band."""
    bands = np.zeros((300, 100, 3), np.uint8)
    bands[:100] = (255, 0, 0)
    bands[100:200] = (0, 255, 0)
    bands[200:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(bands).save(buf, format="PNG")
    out = im._decode_image(buf.getvalue(), "cub", "test")
    assert out.shape == (84, 84, 3)
    assert (out == (0, 255, 0)).all()
    # Landscape: 300x100 (w x h) -> 378x126; columns 147..231 inside the middle vertical band.
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(bands.transpose(1, 0, 2))).save(buf, format="PNG")
    assert (im._decode_image(buf.getvalue(), "cub", "test") == (0, 255, 0)).all()


def test_cars(tmp_path):
    root = fx.write_cars_hdf5(tmp_path, CLASSES, PER_CLASS)
    with h5py.File(root / "test_data.hdf5") as f:  # the real layout stores float32
        assert next(iter(f["datasets"].values())).dtype == np.float32
    data = im.load_cars(root, ["test"], progress=False)
    assert_split(data["test"], 2, PER_CLASS, [5, 6], tol=0.5)
    np.testing.assert_array_equal(data["test"].class_images(1), fx.class_images(6, PER_CLASS))


def test_write_all_and_describe(tmp_path, cache):
    fx.write_all(tmp_path, images_per_class=3)
    counts = {"train": 6, "val": 5, "test": 5}
    loaded = {name: loader(tmp_path / name, progress=False, cache_dir=cache) for name, loader in im.LOADERS.items()}
    for data in loaded.values():
        assert {s: d.num_classes for s, d in data.items()} == counts
        assert all(len(d.images) == 3 * d.num_classes for d in data.values())
    assert im.describe(loaded["cub"], "cub") == ("cub: train 6 classes / 18 images (standard split: 100 classes), "
                                        "val 5 classes / 15 images (standard split: 50 classes), "
                                        "test 5 classes / 15 images (standard split: 50 classes)")


# ---------------------------------------------------------------------------------------------------
# Decode cache
# ---------------------------------------------------------------------------------------------------

def count_decodes(monkeypatch) -> list:
    calls = []
    real = im._decode_image

    def counting(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(im, "_decode_image", counting)
    return calls


def test_cache_reused_then_rebuilt_on_mtime_change(tmp_path, cache, monkeypatch):
    root = fx.write_cub_hdf5(tmp_path, CLASSES, PER_CLASS)
    first = im.load_cub(root, ["train"], progress=False, cache_dir=cache)["train"]
    calls = count_decodes(monkeypatch)
    second = im.load_cub(root, ["train"], progress=False, cache_dir=cache)["train"]
    assert calls == []  # served from the memory-mapped cache
    np.testing.assert_array_equal(first.images, second.images)
    assert second.class_names == first.class_names and (second.offsets == first.offsets).all()
    assert not second.images.flags.writeable

    st = (root / "train_data.hdf5").stat()
    os.utime(root / "train_data.hdf5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = im.load_cub(root, ["train"], progress=False, cache_dir=cache)["train"]
    assert len(calls) == 3 * PER_CLASS
    np.testing.assert_array_equal(first.images, third.images)
    # The stale cache of the same source was removed; no temp files are left.
    assert len(list((cache / "images").glob("cub-train-*.npy"))) == 1
    assert not list((cache / "images").glob(".*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage_sidecar", "drop_sidecar"])
def test_corrupt_cache_is_rebuilt(tmp_path, cache, monkeypatch, damage):
    root = fx.write_cub_hdf5(tmp_path, CLASSES, PER_CLASS)
    first = np.array(im.load_cub(root, ["val"], progress=False, cache_dir=cache)["val"].images)
    (npy,) = (cache / "images").glob("cub-val-*.npy")
    if damage == "truncate":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size - 1000)
    elif damage == "garbage_sidecar":
        npy.with_suffix(".json").write_text("{not json")
    else:
        npy.with_suffix(".json").unlink()
    calls = count_decodes(monkeypatch)
    again = im.load_cub(root, ["val"], progress=False, cache_dir=cache)["val"]
    assert len(calls) == 2 * PER_CLASS
    np.testing.assert_array_equal(again.images, first)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMT_CACHE", str(tmp_path / "env-cache"))
    assert im.image_cache_dir() == tmp_path / "env-cache" / "images"
    monkeypatch.delenv("SIMT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert im.image_cache_dir() == tmp_path / "xdg" / "simt" / "images"
    root = fx.write_miniimagenet_csv(tmp_path, {"test": 2}, 2)
    im.load_miniimagenet(root, ["test"], progress=False)
    assert list((tmp_path / "xdg" / "simt" / "images").glob("miniimagenet-test-*.npy"))


def test_progress_bar_on_stderr(tmp_path, cache, capsys):
    root = fx.write_cub_hdf5(tmp_path, {"test": 2}, 2)
    im.load_cub(root, ["test"], progress=True, cache_dir=cache)
    captured = capsys.readouterr()
    assert "decoding cub test" in captured.err and captured.out == ""


# ---------------------------------------------------------------------------------------------------
# Bad input: one-line DataError naming the file
# ---------------------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(tmp_path / "nowhere")
    one_line(e, "nowhere", "folder not found", "<split>_data.hdf5", "mini-imagenet-cache-<split>.pkl")


@pytest.mark.parametrize("loader, looked_for", [
    (im.load_miniimagenet, ["val_data.hdf5", "val_labels.json", "mini-imagenet-cache-val.pkl", "val.csv", "images/"]),
    (im.load_tieredimagenet, ["val_data.hdf5", "val_images.npz", "val_labels.pkl", "val_images_png.pkl"]),
    (im.load_cub, ["val_data.hdf5", "val_labels.json"]),
    (im.load_cars, ["val_data.hdf5", "val_labels.json"]),
])
def test_missing_split_names_every_layout(tmp_path, loader, looked_for):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError) as e:
        loader(tmp_path / "d", ["val"], progress=False)
    one_line(e, str(tmp_path / "d"), "'val'", *looked_for)


def test_missing_companion_files(tmp_path):
    root = fx.write_miniimagenet_hdf5(tmp_path, CLASSES, 2)
    (root / "train_labels.json").unlink()
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(root, progress=False)
    one_line(e, "train_labels.json", "not found")

    root = fx.write_tiered_npz(tmp_path, CLASSES, 2)
    (root / "test_labels.pkl").unlink()
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, progress=False)
    one_line(e, "test_labels.pkl", "not found")

    root = fx.write_miniimagenet_csv(tmp_path / "csv", CLASSES, 2)
    next((root / "images").iterdir()).unlink()
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(root, progress=False)
    one_line(e, ".jpg", "not found", ".csv")


def test_validation_happens_before_any_decoding(tmp_path, cache, monkeypatch):
    """A broken test split is reported before the train split is decoded."""
    root = fx.write_cub_hdf5(tmp_path, CLASSES, 2)
    (root / "test_labels.json").write_text('["no such class"]')
    monkeypatch.setattr(im, "_decode_image", lambda *a: pytest.fail("decoded before validating"))
    with pytest.raises(DataError) as e:
        im.load_cub(root, progress=False, cache_dir=cache)
    one_line(e, "test_labels.json", "'no such class'", "does not match")


def _rewrite_h5(path, name, data):
    with h5py.File(path, "a") as f:
        del f["datasets"][name]
        f["datasets"].create_dataset(name, data=data)


def test_wrong_shapes_and_dtypes(tmp_path):
    root = fx.write_miniimagenet_hdf5(tmp_path, CLASSES, 2)
    name = json.loads((root / "val_labels.json").read_text())[0]
    _rewrite_h5(root / "val_data.hdf5", name, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(root, progress=False)
    one_line(e, "val_data.hdf5", name, "(N, 84, 84, 3)", "(2, 32, 32, 3)")

    root = fx.write_cars_hdf5(tmp_path, CLASSES, 2)
    _rewrite_h5(root / "test_data.hdf5", json.loads((root / "test_labels.json").read_text())[1],
                np.full((2, 84, 84, 3), 300.0, np.float32))
    with pytest.raises(DataError) as e:
        im.load_cars(root, ["test"], progress=False)
    one_line(e, "test_data.hdf5", "0..255")

    root = tmp_path / "p" / "miniimagenet"
    root.mkdir(parents=True)
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {"a": [0, 1]}}, f)
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(root, ["train"], progress=False)
    one_line(e, "mini-imagenet-cache-train.pkl", "'image_data'", "(2, 84, 84)")

    root = tmp_path / "t" / "tieredimagenet"
    root.mkdir(parents=True)
    np.savez(root / "train_images.npz", images=np.zeros((2, 84, 84, 3), np.float32))
    with open(root / "train_labels.pkl", "wb") as f:
        pickle.dump({"labels": [0, 0]}, f)
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, ["train"], progress=False)
    one_line(e, "train_images.npz", "uint8", "float32")

    root = fx.write_cub_hdf5(tmp_path, CLASSES, 2)
    _rewrite_h5(root / "val_data.hdf5", json.loads((root / "val_labels.json").read_text())[0],
                np.zeros((2, 84, 84, 3), np.uint8))
    with pytest.raises(DataError) as e:
        im.load_cub(root, progress=False)
    one_line(e, "val_data.hdf5", "variable-length uint8")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_hdf5_and_npz(tmp_path):
    root = fx.write_tiered_hdf5(tmp_path, CLASSES, 2)
    _truncate(root / "train_data.hdf5")
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, progress=False)
    one_line(e, "train_data.hdf5", "truncated")

    root = fx.write_tiered_npz(tmp_path / "npz", CLASSES, 2)
    _truncate(root / "val_images.npz", 0.9)
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, progress=False)
    one_line(e, "val_images.npz", "truncated")

    # A zip whose central directory survives but whose data is cut short.
    root = tmp_path / "short" / "tieredimagenet"
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "train_images.npz", "w") as z:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros((4, 84, 84, 3), np.uint8))
        z.writestr("images.npy", buf.getvalue()[:-5000])
    with open(root / "train_labels.pkl", "wb") as f:
        pickle.dump({"labels": [0, 0, 1, 1]}, f)
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, ["train"], progress=False)
    one_line(e, "train_images.npz", "images")


def test_labels_that_do_not_match_the_data(tmp_path):
    root = fx.write_tiered_npz(tmp_path, CLASSES, 2, labels_format="metaoptnet")
    with open(root / "val_labels.pkl", "wb") as f:
        pickle.dump({"labels": [3, 3, 4]}, f)  # 3 labels for 4 images
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, progress=False)
    one_line(e, "val_labels.pkl", "3 labels", "4 images", "does not match")

    root = tmp_path / "m" / "miniimagenet"
    root.mkdir(parents=True)
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((3, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 1], "b": [5]}}, f)
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(root, ["test"], progress=False)
    one_line(e, "mini-imagenet-cache-test.pkl", "exactly once", "do not match")

    root = fx.write_tiered_png_pkl(tmp_path / "png", CLASSES, 2)
    with open(root / "train_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": np.array([0, 0, 1, 1, 2, 7]), "label_specific_str": ["a", "b", "c"]}, f)
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, progress=False)
    one_line(e, "train_labels.pkl", "label_specific_str")

    root = fx.write_tiered_npz(tmp_path / "keys", CLASSES, 2)
    with open(root / "train_labels.pkl", "wb") as f:
        pickle.dump({"label": [0, 0, 1, 1, 2, 2]}, f)
    with pytest.raises(DataError) as e:
        im.load_tieredimagenet(root, progress=False)
    one_line(e, "train_labels.pkl", "'label_specific'", "'labels'", "['label']")


def test_bad_csv_and_bad_image_bytes(tmp_path, cache):
    root = fx.write_miniimagenet_csv(tmp_path, CLASSES, 2)
    (root / "val.csv").write_text("name;class\nx.jpg;n1\n")
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(root, progress=False, cache_dir=cache)
    one_line(e, "val.csv", "filename,label")

    root = fx.write_cub_hdf5(tmp_path, CLASSES, 2)
    name = json.loads((root / "test_labels.json").read_text())[1]
    with h5py.File(root / "test_data.hdf5", "a") as f:
        f["datasets"][name][1] = np.frombuffer(b"\xff\xd8 not really a jpeg", np.uint8)
    with pytest.raises(DataError) as e:
        im.load_cub(root, ["test"], progress=False, cache_dir=cache)
    one_line(e, "test_data.hdf5", name, "image 1", "cannot decode")
    assert not list((cache / "images").glob("*cub-test-*"))  # neither a cache nor a temp file is left


def test_unknown_split(tmp_path):
    with pytest.raises(DataError) as e:
        im.load_cub(tmp_path, ["training"])
    one_line(e, "'training'", "train, val, test")


# ---------------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------------

class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evals:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("payload, forbidden", [
    (lambda m: {"image_data": _RunsShell(m)}, "posix.system"),
    (lambda m: {"class_dict": {"a": [_Evals(m)]}}, "builtins.eval"),
    (lambda m: {"image_data": np.array([_RunsShell(m)], dtype=object)}, "posix.system"),
])
def test_crafted_pickle_is_rejected_and_not_run(tmp_path, payload, forbidden):
    marker = tmp_path / "pwned"
    root = tmp_path / "miniimagenet"
    root.mkdir()
    path = root / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(DataError) as e:
        im.load_miniimagenet(root, ["train"], progress=False)
    one_line(e, str(path), forbidden, "refusing")
    assert not marker.exists()


def test_foreign_objects_and_junk_are_rejected(tmp_path):
    import datetime
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"labels": [datetime.date(2020, 1, 1)]}))
    with pytest.raises(DataError) as e:
        safe_load_pickle(path)
    one_line(e, "x.pkl", "datetime.date")
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError) as e:
        safe_load_pickle(path)
    one_line(e, "x.pkl", "not a readable pickle")
    path.write_bytes(pickle.dumps({"a": np.arange(10)})[:-20])
    with pytest.raises(DataError) as e:
        safe_load_pickle(path)
    one_line(e, "x.pkl")
    with pytest.raises(DataError) as e:
        safe_load_pickle(tmp_path / "missing.pkl")
    one_line(e, "missing.pkl", "missing file")


def test_safe_load_pickle_reads_numpy_and_containers(tmp_path):
    obj = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": [1, 2.5, "s", b"raw", (np.int64(7),)],
           "c": {3, 4}, "d": np.zeros((2, 2), np.float32)[:, ::-1]}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        got = safe_load_pickle(path)
        np.testing.assert_array_equal(got["a"], obj["a"])
        assert got["b"] == obj["b"] and got["c"] == obj["c"]
        np.testing.assert_array_equal(got["d"], obj["d"])
    # A Python-2 pickle: byte strings become str (latin1), numpy.core names resolve.
    path = tmp_path / "py2.pkl"
    path.write_bytes(fx.py2_pickle({"k": [1, 2], "arr": np.arange(4, dtype=np.int64), "s": "\xe9t\xe9"}))
    got = safe_load_pickle(path)
    assert got["k"] == [1, 2] and got["s"] == "\xe9t\xe9"
    np.testing.assert_array_equal(got["arr"], np.arange(4))
