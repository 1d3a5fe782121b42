"""Dataset readers, the decode cache and data discovery, on small files built per test."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import write_image_folder
from otlt.data import cache as cache_mod
from otlt.data.cache import load_cached
from otlt.data.cifar import read_cifar_python
from otlt.data.folders import read_image_folder
from otlt.data.io import to_rgb
from otlt.data.lists import ListFileDataset, read_list_file
from otlt.data.sources import data_format, find_data, load_dataset
from otlt.data.types import ImageArrays
from otlt.errors import OtltError

REPO = Path(__file__).resolve().parents[1]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


# ------------------------------------------------------------------------------- builders


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _chw_rows_to_hwc(data: np.ndarray) -> np.ndarray:
    """Reference CIFAR decoding written independently of the reader: split the planes."""
    n = len(data)
    r, g, b = data[:, :1024], data[:, 1024:2048], data[:, 2048:]
    return np.stack([r, g, b], axis=-1).reshape(n, 32, 32, 3)


def _write_cifar(root: Path, num_classes: int, as_tar: bool, protocol: int = 2,
                 n_train: int = 4, n_test: int = 3) -> tuple[Path, dict]:
    """Write a miniature CIFAR-10/100 python archive; return its path and the raw arrays."""
    rng = _rng(num_classes)
    if num_classes == 10:
        folder, label_key = "cifar-10-batches-py", b"labels"
        classes = CIFAR10_NAMES
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        files = {**{n: None for n in train_files}, "test_batch": None}
        meta_name, meta = "batches.meta", {b"label_names": [c.encode() for c in classes],
                                           b"num_vis": 3072}
    else:
        folder, label_key = "cifar-100-python", b"fine_labels"
        classes = [f"class{k:03d}" for k in range(100)]
        train_files = ["train"]
        files = {"train": None, "test": None}
        meta_name, meta = "meta", {b"fine_label_names": [c.encode() for c in classes],
                                   b"coarse_label_names": [b"x"] * 20}
    raw = {}
    for name in files:
        n = n_test if name in ("test_batch", "test") else n_train
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).tolist()
        batch = {b"data": data, label_key: labels, b"batch_label": name.encode(),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        if num_classes == 100:
            batch[b"coarse_labels"] = [(label + 7) % 20 for label in labels]  # must be ignored
        raw[name] = batch
    blobs = {n: pickle.dumps(b, protocol=protocol) for n, b in raw.items()}
    blobs[meta_name] = pickle.dumps(meta, protocol=protocol)
    if as_tar:
        path = root / ("cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz")
        with tarfile.open(path, "w:gz") as tar:
            tar.addfile(tarfile.TarInfo(folder))  # a directory-like entry first, as upstream
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        path = root / folder
        path.mkdir(parents=True)
        for name, blob in blobs.items():
            (path / name).write_bytes(blob)
    test_name = "test_batch" if num_classes == 10 else "test"
    expected = {
        "train": (np.concatenate([raw[n][b"data"] for n in train_files]),
                  sum((raw[n][label_key] for n in train_files), [])),
        "test": (raw[test_name][b"data"], raw[test_name][label_key]),
        "classes": classes,
    }
    return path, expected


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    return _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image JPEG reproduces to within a few grey levels."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base * 0.8 + seed * 5, 0, 255).astype(np.uint8)


def _zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


def _small_spec(h: int = 8, w: int = 8, smooth: bool = False) -> dict:
    make = _smooth if smooth else _pattern
    return {
        "train": {"dog": [make(h, w, 1), make(h, w, 2), make(h, w, 3)],
                  "cat": [make(h, w, 4)], "emu": [make(h, w, 5), make(h, w, 6)]},
        "test": {"cat": [make(h, w, 7)], "dog": [make(h, w, 8)], "emu": [make(h, w, 10)]},
    }


def _expected_split(spec_split: dict, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for k, cls in enumerate(classes):
        for img in spec_split.get(cls, []):
            images.append(img)
            labels.append(k)
    return np.stack(images), np.array(labels)


# ---------------------------------------------------------------------------- CIFAR python


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("as_tar", [True, False], ids=["tar.gz", "folder"])
def test_cifar_python_round_trips_pixels_labels_and_names(tmp_path, num_classes, as_tar):
    path, expected = _write_cifar(tmp_path, num_classes, as_tar)
    splits = read_cifar_python(path)
    assert set(splits) == {"train", "test"}
    for split in ("train", "test"):
        data, labels = expected[split]
        got = splits[split]
        assert got.images.shape == (len(data), 32, 32, 3) and got.images.dtype == np.uint8
        np.testing.assert_array_equal(got.images, _chw_rows_to_hwc(data))
        np.testing.assert_array_equal(got.labels, labels)
        assert got.labels.dtype == np.int64
        assert got.classes == expected["classes"]
    # One pixel by hand: row 0, (y=1, x=2), green is plane 1 at offset 1 * 32 + 2.
    assert splits["train"].images[0, 1, 2, 1] == expected["train"][0][0, 1024 + 34]


def test_cifar_folder_accepts_its_parent_and_protocol_5(tmp_path):
    path, expected = _write_cifar(tmp_path, 10, as_tar=False, protocol=5)
    splits = read_cifar_python(path.parent)
    np.testing.assert_array_equal(splits["test"].images, _chw_rows_to_hwc(expected["test"][0]))


def test_cifar_refuses_a_pickle_that_runs_code(tmp_path):
    path, _ = _write_cifar(tmp_path, 10, as_tar=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(OtltError, match=r"test_batch.*refusing to load global"):
        read_cifar_python(path)


def test_cifar_label_out_of_range_names_the_batch(tmp_path):
    path, _ = _write_cifar(tmp_path, 10, as_tar=False)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (path / "data_batch_3").write_bytes(pickle.dumps(batch))
    with pytest.raises(OtltError, match=r"data_batch_3.*\[0, 9\]"):
        read_cifar_python(path)


def test_truncated_cifar_tarball_is_a_clear_error(tmp_path):
    path, _ = _write_cifar(tmp_path, 10, as_tar=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OtltError, match="truncated"):
        load_dataset("cifar10", path, cache=False)


# --------------------------------------------------------------------------- image folders


def test_image_folder_directory_reads_exact_png_pixels(tmp_path):
    spec = write_image_folder(tmp_path / "ds", _small_spec())
    splits = read_image_folder(tmp_path / "ds")
    assert set(splits) == {"train", "test"}
    classes = ["cat", "dog", "emu"]
    for split in ("train", "test"):
        images, labels = _expected_split(spec[split], classes)
        assert splits[split].classes == classes
        np.testing.assert_array_equal(splits[split].images, images)
        np.testing.assert_array_equal(splits[split].labels, labels)


@pytest.mark.parametrize("prefix", ["", "cifar-mini/"])
def test_image_folder_zip_read_in_place_with_optional_prefix(tmp_path, prefix):
    spec = _small_spec()
    spec["val"] = {"emu": [_pattern(8, 8, 9)]}
    write_image_folder(tmp_path / "ds", spec)
    zip_path = _zip_folder(tmp_path / "ds", tmp_path / "mini.zip", prefix)
    splits = read_image_folder(zip_path)
    assert list(splits) == ["train", "test", "val"]
    np.testing.assert_array_equal(splits["val"].images[0], spec["val"]["emu"][0])
    np.testing.assert_array_equal(splits["val"].labels, [2])
    images, _ = _expected_split(spec["train"], ["cat", "dog", "emu"])
    np.testing.assert_array_equal(splits["train"].images, images)


def test_image_folder_files_are_sorted_by_name(tmp_path):
    imgs = [_pattern(4, 4, s) for s in range(3)]
    for name, img in zip(["b.png", "c.png", "a.png"], imgs, strict=True):
        (tmp_path / "ds" / "train" / "x").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "ds" / "train" / "x" / name)
    write_image_folder(tmp_path / "ds", {"test": {"x": [imgs[0]]}})
    got = read_image_folder(tmp_path / "ds")["train"].images
    np.testing.assert_array_equal(got, np.stack([imgs[2], imgs[0], imgs[1]]))


@pytest.mark.parametrize("as_zip", [False, True], ids=["dir", "zip"])
def test_image_folder_decodes_jpeg_and_grayscale_to_rgb(tmp_path, as_zip):
    spec = write_image_folder(tmp_path / "ds", _small_spec(16, 16, smooth=True), ext="jpg")
    gray = _smooth(16, 16, 0)[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "ds" / "test" / "cat" / "9999.jpeg")
    source = _zip_folder(tmp_path / "ds", tmp_path / "j.zip") if as_zip else tmp_path / "ds"
    splits = read_image_folder(source)
    images, _ = _expected_split(spec["train"], ["cat", "dog", "emu"])
    err = np.abs(splits["train"].images.astype(int) - images.astype(int))
    assert err.mean() < 3 and splits["train"].images.shape == (6, 16, 16, 3)
    last = splits["test"].images[1].astype(int)  # cat/9999.jpeg sorts after cat/0000.jpg
    assert np.abs(last - gray[..., None].astype(int)).mean() < 3
    np.testing.assert_array_equal(last[..., 0], last[..., 2])  # grey stays grey


def test_image_folder_mixed_sizes_suggest_list_files(tmp_path):
    spec = _small_spec()
    spec["train"]["dog"].append(_pattern(10, 12, 0))
    write_image_folder(tmp_path / "ds", spec)
    with pytest.raises(OtltError, match=r"dog/0003\.png.*12x10.*8x8.*list-file"):
        read_image_folder(tmp_path / "ds")


def test_image_folder_test_class_missing_from_train(tmp_path):
    spec = _small_spec()
    spec["test"]["yak"] = [_pattern(8, 8, 0)]
    write_image_folder(tmp_path / "ds", spec)
    with pytest.raises(OtltError, match=r"\['yak'\]"):
        read_image_folder(tmp_path / "ds")


def test_image_folder_without_test_split(tmp_path):
    write_image_folder(tmp_path / "ds", {"train": _small_spec()["train"]})
    with pytest.raises(OtltError, match=r"no 'test' images.*found splits: \['train'\]"):
        read_image_folder(tmp_path / "ds")


@pytest.mark.parametrize("as_zip", [False, True], ids=["dir", "zip"])
def test_image_folder_process_pool_matches_in_process_decode(tmp_path, as_zip):
    spec = _small_spec()
    spec["train"]["dog"] += [_pattern(8, 8, 10 + i) for i in range(6)]
    write_image_folder(tmp_path / "ds", spec)
    source = _zip_folder(tmp_path / "ds", tmp_path / "p.zip") if as_zip else tmp_path / "ds"
    one = read_image_folder(source, workers=1)
    two = read_image_folder(source, workers=2)
    for split in ("train", "test"):
        np.testing.assert_array_equal(two[split].images, one[split].images)
        np.testing.assert_array_equal(two[split].labels, one[split].labels)


def test_image_folder_process_pool_reports_bad_members(tmp_path):
    spec = _small_spec()
    spec["test"]["emu"] = [_pattern(8, 8, 0)] * 3 + [_pattern(9, 8, 0)]
    write_image_folder(tmp_path / "ds", spec)
    with pytest.raises(OtltError, match=r"test/emu/0003\.png.*8x9 but the first image is 8x8"):
        read_image_folder(tmp_path / "ds", workers=2)
    (tmp_path / "ds" / "test" / "emu" / "0003.png").write_bytes(b"garbage")
    with pytest.raises(OtltError, match=r"cannot decode image 'test/emu/0003\.png'"):
        read_image_folder(tmp_path / "ds", workers=2)


# ------------------------------------------------------------------------------ list files


def test_read_list_file_parses_paths_labels_and_blank_lines(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("train/a/1.jpg 3\n\n  train/b c/2.jpg 0  \ntrain/a/3.jpg 12\n")
    paths, labels = read_list_file(lst)
    assert paths == ["train/a/1.jpg", "train/b c/2.jpg", "train/a/3.jpg"]
    np.testing.assert_array_equal(labels, [3, 0, 12])
    assert labels.dtype == np.int64


@pytest.mark.parametrize("bad", ["train/a/2.jpg", "train/a/2.jpg x", "train/a/2.jpg -1"])
def test_read_list_file_bad_line_names_file_and_line(tmp_path, bad):
    lst = tmp_path / "train.txt"
    lst.write_text(f"train/a/1.jpg 3\n\n{bad}\n")
    with pytest.raises(OtltError, match=rf"train\.txt:3: .*{bad}"):
        read_list_file(lst)


def _list_dataset(tmp_path: Path, **kw) -> ListFileDataset:
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i in range(6):
        Image.fromarray(_pattern(30 + 4 * i, 40, i)).save(root / "imgs" / f"{i}.png")
        lines.append(f"imgs/{i}.png {i % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return ListFileDataset(root, tmp_path / "list.txt", **kw)


def test_list_dataset_eval_is_a_centre_crop_of_the_resized_image(tmp_path):
    ds = _list_dataset(tmp_path, image_size=14, train=False)
    assert len(ds) == 6 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0, 1, 2])
    # Left half black, right half white: the centre crop keeps the split in the middle.
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 20:] = 255
    img[..., 1] = 7  # a constant green plane checks the channel order
    Image.fromarray(img).save(tmp_path / "root" / "imgs" / "0.png")
    x, y = ds[0]
    assert x.shape == (3, 14, 14) and x.dtype == torch.uint8 and y == 0
    assert (x[0, :, :6] == 0).all() and (x[0, :, -6:] == 255).all()
    assert (x[1] == 7).all()
    assert torch.equal(ds[0][0], x)


def test_list_dataset_train_crops_are_seeded_by_seed_epoch_and_index(tmp_path):
    ds = _list_dataset(tmp_path, image_size=16, train=True, seed=3)
    first = ds[2][0]
    assert first.shape == (3, 16, 16) and torch.equal(ds[2][0], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], first)
    ds.set_epoch(0)
    assert torch.equal(ds[2][0], first)


def test_list_dataset_workers_match_the_main_process(tmp_path):
    ds = _list_dataset(tmp_path, image_size=12, train=True)
    ds.set_epoch(5)
    main = [b[0] for b in DataLoader(ds, batch_size=3, num_workers=0)]
    workers = [b[0] for b in DataLoader(ds, batch_size=3, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))


def test_list_dataset_corrupt_image_names_the_path(tmp_path):
    ds = _list_dataset(tmp_path, train=False)
    (tmp_path / "root" / "imgs" / "4.png").write_bytes(b"not a png at all")
    with pytest.raises(OtltError, match=r"imgs/4\.png"):
        ds[4]


def test_list_dataset_wrong_root_is_reported(tmp_path):
    _list_dataset(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OtltError, match=r"imgs/0\.png.*does not exist"):
        ListFileDataset(tmp_path / "elsewhere", tmp_path / "list.txt")


def test_a_missing_image_of_an_evaluation_list_is_found_at_once(tmp_path):
    """A test list's missing image used to surface after the training epochs, at the first
    evaluation; training lists are checked by their first entry (an epoch finds the rest)."""
    ds = _list_dataset(tmp_path, train=False)
    (ds.root / "imgs" / "3.png").unlink()
    (ds.root / "imgs" / "5.png").unlink()
    with pytest.raises(OtltError, match=r"list\.txt: 2 of 6 images do not exist under .*root, "
                                        r"the first 'imgs/3\.png'"):
        ListFileDataset(ds.root, tmp_path / "list.txt", train=False)
    assert len(ListFileDataset(ds.root, tmp_path / "list.txt", train=True)) == 6


def test_sixteen_bit_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    """Pillow's convert("RGB") clips a 16-bit value like 30000 to 255."""
    spec = _small_spec()
    write_image_folder(tmp_path / "d", spec)
    deep = np.full((8, 8), 30000, np.uint16)
    Image.fromarray(deep).save(tmp_path / "d" / "train" / "cat" / "0000.png")
    assert Image.open(tmp_path / "d" / "train" / "cat" / "0000.png").mode.startswith("I")
    got = read_image_folder(tmp_path / "d", workers=0)["train"]
    cat = got.images[got.labels == got.classes.index("cat")]
    assert cat.shape == (1, 8, 8, 3) and (cat == 30000 >> 8).all()
    Image.fromarray(deep).save(tmp_path / "deep.png")
    (tmp_path / "list.txt").write_text("deep.png 0\n")
    image, _ = ListFileDataset(tmp_path, tmp_path / "list.txt", image_size=8, train=False)[0]
    assert image.dtype == torch.uint8 and (image == 30000 >> 8).all()  # not 255


@pytest.mark.parametrize("value, expected", [(30000, 117), (200, 200)])
def test_32_bit_integer_images_are_16_bit_only_above_255(value, expected):
    """A 32-bit TIFF of 8-bit values is mode I, as a 16-bit PGM is: shifting it would turn
    it black, so with no 16-bit format to go by the values decide."""
    img = Image.fromarray(np.full((4, 4), value, np.int32), "I")
    assert (np.asarray(to_rgb(img)) == expected).all()


@pytest.mark.parametrize("fmt, suffix", [("PPM", "pgm"), ("PNG", "png"), ("TIFF", "tif")])
def test_a_dark_16_bit_frame_is_scaled_like_its_neighbours(tmp_path, fmt, suffix):
    """16-bit files whose values all lie below 256 (a dark frame) are 16-bit all the same:
    200 of 65535 is black, not 200 of 255. Pillow opens the PGM as mode I, which only the
    format tells from 8-bit values (older Pillow opens the PNG as mode I too; the PNG and
    TIFF here, I;16, guard the modes' rule)."""
    path = tmp_path / f"dark.{suffix}"
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(path, format=fmt)
    with Image.open(path) as img:
        assert img.mode == "I" if fmt == "PPM" else img.mode in ("I", "I;16")
        assert (np.asarray(to_rgb(img)) == 0).all()


def test_linked_split_folders_are_read(tmp_path):
    spec = _small_spec()
    write_image_folder(tmp_path / "real", spec)
    (tmp_path / "linked").mkdir()
    for split in ("train", "test"):
        (tmp_path / "linked" / split).symlink_to(tmp_path / "real" / split)
    got = load_dataset("folder", tmp_path / "linked")
    assert got["train"].classes == ["cat", "dog", "emu"] and len(got["train"].labels) == 6


def test_a_link_back_to_an_ancestor_is_named_and_a_shared_folder_is_not(tmp_path):
    """followlinks would walk a link back to an ancestor until the path is too long; a class
    folder that two places link (test/cat -> pool/cat beside train/cat -> pool/cat) is
    fine, as it was before links were followed."""
    write_image_folder(tmp_path / "loop", _small_spec())
    (tmp_path / "loop" / "train" / "dog" / "again").symlink_to(tmp_path / "loop" / "train")
    with pytest.raises(OtltError, match=r"loop/train/dog/again links back to .*loop/train, "
                                        r"a folder that contains it"):
        load_dataset("folder", tmp_path / "loop")
    spec = _small_spec()
    write_image_folder(tmp_path / "shared", spec)
    (tmp_path / "shared" / "pool").mkdir()
    (tmp_path / "shared" / "train" / "cat").rename(tmp_path / "shared" / "pool" / "cat")
    for split in ("train", "test"):
        link = tmp_path / "shared" / split / "cat"
        if link.exists():
            for f in link.iterdir():
                f.unlink()
            link.rmdir()
        link.symlink_to(tmp_path / "shared" / "pool" / "cat")
    got = load_dataset("folder", tmp_path / "shared")
    assert got["train"].classes == ["cat", "dog", "emu"]
    assert np.array_equal(got["train"].images[got["train"].labels == 0],
                          got["test"].images[got["test"].labels == 0])


def test_a_meta_folder_or_macos_junk_beside_the_data_keeps_it_an_image_folder(tmp_path):
    """CIFAR-100's file names are looked for as files; ``__MACOSX/`` left by unzipping a Mac
    zip is not a second data folder."""
    write_image_folder(tmp_path / "a", _small_spec())
    for name in ("meta", "train_extra"):
        (tmp_path / "a" / name).mkdir()
    assert load_dataset("folder", tmp_path / "a")["train"].classes == ["cat", "dog", "emu"]
    write_image_folder(tmp_path / "b" / "mydata", _small_spec())
    (tmp_path / "b" / "__MACOSX" / "mydata").mkdir(parents=True)
    assert data_format(tmp_path / "b") == "image-folder"  # one data folder under b/, not two
    assert find_data("folder", tmp_path / "b") == tmp_path / "b"
    assert load_dataset("folder", tmp_path / "b")["test"].classes == ["cat", "dog", "emu"]


# ----------------------------------------------------------------------------------- cache


def _counting_build(calls: list, value: int = 1):
    def build() -> dict[str, ImageArrays]:
        calls.append(1)
        images = np.full((2, 4, 4, 3), value, np.uint8)
        return {"train": ImageArrays(images, np.array([0, 1]), ["a", "b"]),
                "test": ImageArrays(images[:1], np.array([1]), ["a", "b"])}
    return build


def test_cache_hit_skips_build_and_round_trips(tmp_path):
    src = tmp_path / "data.zip"
    src.write_bytes(b"v1")
    calls: list = []
    first = load_cached(src, _counting_build(calls, 5), tmp_path / "cache")
    second = load_cached(src, _counting_build(calls, 9), tmp_path / "cache")
    assert len(calls) == 1
    for split in ("train", "test"):
        np.testing.assert_array_equal(second[split].images, first[split].images)
        np.testing.assert_array_equal(second[split].labels, first[split].labels)
        assert second[split].classes == ["a", "b"]
    assert second["train"].labels.dtype == np.int64


def test_cache_rebuilds_when_the_source_changes_and_drops_the_stale_entry(tmp_path):
    src, cache_dir = tmp_path / "data.zip", tmp_path / "cache"
    src.write_bytes(b"v1")
    calls: list = []
    load_cached(src, _counting_build(calls, 1), cache_dir)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same size
    got = load_cached(src, _counting_build(calls, 2), cache_dir)
    assert len(calls) == 2 and got["train"].images[0, 0, 0, 0] == 2
    src.write_bytes(b"version 2")
    load_cached(src, _counting_build(calls, 3), cache_dir)
    assert len(calls) == 3
    assert len(list(cache_dir.glob("*.npz"))) == 1
    assert not list(cache_dir.glob(".*.tmp"))


def test_a_cache_the_disk_refuses_is_a_warning_and_leaves_no_file(tmp_path, monkeypatch,
                                                                    caplog):
    """A full disk while the cache entry is written: the data still comes back, one warning
    names the entry and the reason, and neither a half entry nor a temp file is left."""
    src, cache_dir = tmp_path / "data.zip", tmp_path / "cache"
    src.write_bytes(b"v1")

    def full_disk(fd):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "fsync", full_disk)
    calls: list = []
    with caplog.at_level("WARNING"):
        got = load_cached(src, _counting_build(calls, 5), cache_dir)
    assert got["train"].images[0, 0, 0, 0] == 5 and len(calls) == 1
    assert "No space left on device); continuing without the cache" in caplog.text
    assert "cannot write" in caplog.text and str(cache_dir) in caplog.text
    assert list(cache_dir.iterdir()) == []


def test_cache_key_of_a_folder_covers_its_files(tmp_path):
    src = tmp_path / "folder"
    (src / "train").mkdir(parents=True)
    (src / "train" / "a.png").write_bytes(b"x")
    calls: list = []
    load_cached(src, _counting_build(calls), tmp_path / "cache")
    load_cached(src, _counting_build(calls), tmp_path / "cache")
    assert len(calls) == 1
    (src / "train" / "b.png").write_bytes(b"y")
    load_cached(src, _counting_build(calls), tmp_path / "cache")
    assert len(calls) == 2


def test_corrupt_cache_entry_is_rebuilt_not_fatal(tmp_path):
    src, cache_dir = tmp_path / "data.zip", tmp_path / "cache"
    src.write_bytes(b"v1")
    calls: list = []
    load_cached(src, _counting_build(calls, 4), cache_dir)
    (entry,) = cache_dir.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    got = load_cached(src, _counting_build(calls, 4), cache_dir)
    assert len(calls) == 2 and got["train"].images[0, 0, 0, 0] == 4
    load_cached(src, _counting_build(calls, 4), cache_dir)
    assert len(calls) == 2  # the rebuilt entry is good again


def test_cache_uses_env_dir_and_survives_an_unwritable_one(tmp_path, monkeypatch):
    src = tmp_path / "data.zip"
    src.write_bytes(b"v1")
    monkeypatch.setenv("OTLT_CACHE", str(tmp_path / "envcache"))
    calls: list = []
    load_cached(src, _counting_build(calls))
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache dir should be")
    got = load_cached(src, _counting_build(calls, 6), blocker / "sub")
    assert got["train"].images[0, 0, 0, 0] == 6 and len(calls) == 2


def test_cache_key_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    src = tmp_path / "data.zip"
    src.write_bytes(b"v1")
    key = cache_mod.source_fingerprint(src)
    st = src.stat()
    time.sleep(0.05)  # past a coarse timestamp tick (4-10 ms on older kernels)
    src.write_bytes(b"v2")  # same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert src.stat().st_ctime_ns != st.st_ctime_ns
    assert cache_mod.source_fingerprint(src) != key


def test_cache_key_changes_with_the_format_version(tmp_path, monkeypatch):
    src = tmp_path / "data.zip"
    src.write_bytes(b"v1")
    key = cache_mod.source_fingerprint(src)
    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", cache_mod.FORMAT_VERSION + 1)
    assert cache_mod.source_fingerprint(src) != key


# ------------------------------------------------------------------------------ find_data


def test_find_data_prefers_explicit_then_env_then_search(tmp_path, monkeypatch):
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    (tmp_path / "a" / "cifar10-jpeg.zip").write_bytes(b"")
    (tmp_path / "b" / "cifar-10-python.tar.gz").write_bytes(b"")
    (tmp_path / "c" / "cifar10-jpeg.zip").write_bytes(b"")
    monkeypatch.setenv("OTLT_DATA", str(tmp_path / "b"))
    dirs = [tmp_path / "c"]
    assert find_data("cifar10", tmp_path / "a", dirs) == tmp_path / "a" / "cifar10-jpeg.zip"
    assert find_data("cifar10", None, dirs) == tmp_path / "b" / "cifar-10-python.tar.gz"
    monkeypatch.delenv("OTLT_DATA")
    assert find_data("cifar10", None, dirs) == tmp_path / "c" / "cifar10-jpeg.zip"
    direct = tmp_path / "a" / "cifar10-jpeg.zip"
    assert find_data("cifar10", direct, dirs) == direct
    folder, _ = _write_cifar(tmp_path / "a", 10, as_tar=False)  # preferred over the zip
    assert find_data("cifar10", tmp_path / "a", dirs) == folder
    assert find_data("cifar10", folder, dirs) == folder


def test_find_data_default_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv("OTLT_DATA", raising=False)
    work = tmp_path / "main"
    (work / "data").mkdir(parents=True)
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    monkeypatch.chdir(work)
    write_image_folder(shared / "cifar100", {"train": {"x": [_pattern(4, 4, 0)]}})
    (shared / "cifar100-jpeg.zip").write_bytes(b"")
    assert find_data("cifar100") == Path.cwd().parent / "shared" / "data" / "cifar100-jpeg.zip"
    (work / "data" / "cifar100").mkdir()  # empty: not a known format, so skipped
    assert find_data("cifar100").name == "cifar100-jpeg.zip"
    write_image_folder(work / "data" / "cifar100", {"train": {"x": [_pattern(4, 4, 0)]}})
    assert find_data("cifar100") == Path.cwd() / "data" / "cifar100"


def test_find_data_nothing_found_is_one_short_line(tmp_path, monkeypatch):
    """Places, names, formats and the ways out, in one line a terminal shows whole (issue 32
    item 3: it was 700 characters)."""
    monkeypatch.delenv("OTLT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OtltError) as info:
        find_data("cifar10")
    msg = str(info.value)
    assert msg.startswith("no cifar10 data in data or ../shared/data (")
    assert "cifar-10-python.tar.gz" in msg and "cifar10-jpeg.zip" in msg
    assert ".zip" in msg and "<split>/<class>" in msg and "--data PATH" in msg
    assert "$OTLT_DATA" in msg and msg.endswith("otlt data download cifar10")
    assert len(msg) < 260 and "\n" not in msg
    with pytest.raises(OtltError, match="no cifar100 data in /nowhere/data "):
        find_data("cifar100", search_dirs=["/nowhere/data"])


def test_find_data_explicit_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OTLT_DATA", raising=False)
    with pytest.raises(OtltError, match=r"nope.*does not exist"):
        find_data("cifar10", tmp_path / "nope")
    with pytest.raises(OtltError, match=r"\$OTLT_DATA"):
        monkeypatch.setenv("OTLT_DATA", str(tmp_path / "gone"))
        find_data("cifar10")
    monkeypatch.delenv("OTLT_DATA")
    with pytest.raises(OtltError, match=r"is not cifar10 data.*cifar-10-batches-py"):
        find_data("cifar10", tmp_path)
    with pytest.raises(OtltError, match=r"'imagenet_lt' needs an explicit --data"):
        find_data("imagenet_lt")
    assert find_data("imagenet_lt", tmp_path) == tmp_path


# ---------------------------------------------------------------------------- load_dataset


@pytest.mark.parametrize("kind", ["tar", "cifar-folder", "zip", "dir"])
def test_load_dataset_dispatches_and_caches(tmp_path, kind):
    if kind in ("tar", "cifar-folder"):
        path, _ = _write_cifar(tmp_path, 10, as_tar=kind == "tar")
        n_classes = 10
    else:
        write_image_folder(tmp_path / "ds", _small_spec())
        path = _zip_folder(tmp_path / "ds", tmp_path / "d.zip") if kind == "zip" else \
            tmp_path / "ds"
        n_classes = 3
    cache_dir = tmp_path / "cache"
    first = load_dataset("custom", path, num_classes=n_classes, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 1
    again = load_dataset("custom", path, num_classes=n_classes, cache_dir=cache_dir)
    np.testing.assert_array_equal(again["train"].images, first["train"].images)
    assert again["test"].classes == first["test"].classes


def test_load_dataset_class_count_mismatch(tmp_path):
    path, _ = _write_cifar(tmp_path, 10, as_tar=True)
    with pytest.raises(OtltError, match=r"has 10 classes, the config expects 100"):
        load_dataset("cifar10", path, num_classes=100, cache=False)
    with pytest.raises(OtltError, match=r"has 10 classes, the config expects 100"):
        load_dataset("cifar100", path, cache=False)  # implied by the dataset name


def test_load_dataset_missing_and_unknown_formats(tmp_path):
    with pytest.raises(OtltError, match=r"missing\.zip does not exist"):
        load_dataset("cifar10", tmp_path / "missing.zip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OtltError, match=r"notes\.txt has an unknown format.*tar\.gz"):
        load_dataset("cifar10", tmp_path / "notes.txt")
    write_image_folder(tmp_path / "ds", _small_spec())
    (tmp_path / "ds" / "train" / "cat" / "anim.gif").write_bytes(b"GIF89a")
    with pytest.raises(OtltError, match=r"anim\.gif.*not a supported image"):
        load_dataset("x", tmp_path / "ds", cache=False)


def test_load_dataset_truncated_zip(tmp_path):
    write_image_folder(tmp_path / "ds", _small_spec())
    zip_path = _zip_folder(tmp_path / "ds", tmp_path / "cut.zip")
    zip_path.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size * 2 // 3])
    with pytest.raises(OtltError, match=r"cut\.zip.*truncated"):
        load_dataset("x", zip_path, cache_dir=tmp_path / "cache")


def test_load_dataset_corrupt_member_names_it(tmp_path):
    write_image_folder(tmp_path / "ds", _small_spec())
    (tmp_path / "ds" / "train" / "emu" / "x.jpg").write_bytes(os.urandom(300))
    zip_path = _zip_folder(tmp_path / "ds", tmp_path / "bad.zip", "top/")
    with pytest.raises(OtltError, match=r"'top/train/emu/x\.jpg' in .*bad\.zip"):
        load_dataset("x", zip_path, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing half-built is cached


def test_load_dataset_unreadable_file(tmp_path):
    path, _ = _write_cifar(tmp_path, 10, as_tar=True)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who can read a mode-000 file (root)")
        with pytest.raises(OtltError, match="not readable"):
            load_dataset("cifar10", path, cache=False)
    finally:
        path.chmod(0o644)


# ------------------------------------------------------------------------ the real dataset


@pytest.mark.slow
def test_real_cifar10_jpeg_zip(tmp_path, monkeypatch):
    shared = REPO.parent / "shared" / "data"
    if not (shared / "cifar10-jpeg.zip").is_file():
        pytest.skip(f"{shared / 'cifar10-jpeg.zip'} not present")
    monkeypatch.delenv("OTLT_DATA", raising=False)
    path = find_data("cifar10", None, [shared])
    start = time.perf_counter()
    splits = load_dataset("cifar10", path, num_classes=10, cache_dir=tmp_path)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    cached = load_dataset("cifar10", path, num_classes=10, cache_dir=tmp_path)
    warm = time.perf_counter() - start
    print(f"\ncifar10-jpeg.zip: decode {cold:.1f} s, cached load {warm:.2f} s")
    for split, n in (("train", 5000), ("test", 1000)):
        got = splits[split]
        assert got.images.shape == (10 * n, 32, 32, 3)
        assert got.classes == CIFAR10_NAMES
        np.testing.assert_array_equal(np.bincount(got.labels, minlength=10), [n] * 10)
        np.testing.assert_array_equal(cached[split].labels, got.labels)
    assert 20 < splits["train"].images.mean() < 235  # real pixels, not a blank decode
    np.testing.assert_array_equal(cached["test"].images, splits["test"].images)


def test_a_forked_image_decoder_dies_quietly_on_sigterm(tmp_path):
    """The decode pool is forked from a CLI that turns SIGTERM into an exception: each worker
    puts the default back, so a process-group SIGTERM ends it without a traceback and the
    parent alone reports the stop."""
    import signal

    from otlt import cli
    from otlt.data import folders

    assert cli.stop_on_sigterm()
    try:
        folders._init_decoder(tmp_path)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
