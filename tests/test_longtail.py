import numpy as np
import pytest

from conftest import write_image_folder
from otlt.config import DataConfig
from otlt.data.longtail import build_splits, long_tailed_counts
from otlt.data.prepare import prepare_data
from otlt.errors import OtltError


def test_exp_profile_cifar10_phi100_matches_paper():
    counts = long_tailed_counts(10, 5000, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_exp_profile_cifar100_ends():
    counts = long_tailed_counts(100, 500, 100)
    assert counts[0] == 500 and counts[-1] == 5 and len(counts) == 100
    assert all(a >= b for a, b in zip(counts[:-1], counts[1:], strict=True))


def test_step_profile_exact():
    assert long_tailed_counts(10, 5000, 10, profile="step") == [5000] * 5 + [500] * 5
    assert long_tailed_counts(5, 100, 4, profile="step") == [100, 100, 25, 25, 25]


def test_balanced_when_phi_is_one():
    assert long_tailed_counts(10, 5000, 1) == [5000] * 10


@pytest.mark.parametrize("bad", [0.5, 0])
def test_phi_below_one_is_rejected(bad):
    with pytest.raises(OtltError, match="imbalance ratio"):
        long_tailed_counts(10, 5000, bad)


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_a_profile_that_leaves_a_class_empty_is_refused_with_the_n_max_that_fits(profile):
    """n_max=30 at phi=100 gave the tail classes no image, refused only later by the loss
    ("class_counts must be positive integers") without naming the knob."""
    with pytest.raises(OtltError, match=r"n_max=30 with imbalance ratio 100 leaves class\(es\) "
                                        r"\[.*9\] without a training image.*at least 100"):
        long_tailed_counts(10, 30, 100, profile=profile)
    assert min(long_tailed_counts(10, 100, 100, profile=profile)) == 1


def _labels(per_class=200, k=5):
    return np.repeat(np.arange(k), per_class)


def test_splits_are_disjoint_and_counted():
    labels = _labels()
    s = build_splits(labels, 5, imbalance_ratio=10, n_max=200, val_per_class=7,
                     meta_per_class=3, data_seed=1)
    train, val, meta = set(s.train), set(s.val), set(s.meta)
    assert not (train & val) and not (train & meta) and not (val & meta)
    assert np.bincount(labels[s.val], minlength=5).tolist() == [7] * 5
    assert np.bincount(labels[s.meta], minlength=5).tolist() == [3] * 5
    expected = [min(c, 190) for c in long_tailed_counts(5, 200, 10)]
    assert s.train_counts == expected
    assert np.bincount(labels[s.train], minlength=5).tolist() == expected


def test_splits_depend_on_data_seed_only():
    labels = _labels()
    a = build_splits(labels, 5, imbalance_ratio=10, n_max=200, val_per_class=5, data_seed=0)
    b = build_splits(labels, 5, imbalance_ratio=10, n_max=200, val_per_class=5, data_seed=0)
    c = build_splits(labels, 5, imbalance_ratio=10, n_max=200, val_per_class=5, data_seed=1)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)


def test_too_small_class_for_carve_out_is_an_error():
    with pytest.raises(OtltError, match="too few"):
        build_splits(_labels(per_class=10), 5, imbalance_ratio=1, n_max=10, val_per_class=10)


def _image_folder(root, split_counts):
    """``root/<split>/c<k>/NNNN.png``, ``split_counts[split][k]`` tiny distinct images."""
    write_image_folder(root, {split: {f"c{k}": [np.full((4, 4, 3), (k * 60, i % 256, i // 256),
                                                        np.uint8) for i in range(n)]
                                      for k, n in enumerate(counts)}
                              for split, counts in split_counts.items()})


def test_a_profile_the_classes_cannot_give_and_an_unused_val_folder_are_warned(tmp_path,
                                                                              caplog):
    """30 images a class and n_max 100: the profile's 100, 46, 21, 10 are capped at 28 (after
    2 validation images), so the imbalance asked for (10) becomes 2.8, silently until now;
    a val/ folder is read but validation is carved from train."""
    _image_folder(tmp_path, {"train": [30] * 4, "test": [2] * 4, "val": [2] * 4})
    cfg = DataConfig(dataset="folder", path=str(tmp_path), num_classes=4, n_max=100,
                     imbalance_ratio=10, val_per_class=2)
    with caplog.at_level("WARNING"):
        data = prepare_data(cfg, 4)
    assert data.train_counts == [28, 28, 21, 10]
    assert "asks for an imbalance of 10, the classes give 2.8: class(es) [0, 1] hold [72, 18] " \
           "fewer" in caplog.text
    assert "has a val split; otlt carves validation from train" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_data(DataConfig(dataset="folder", path=str(tmp_path / "train" / ".."),
                                num_classes=4, imbalance_ratio=10, val_per_class=2), 4)
    assert "asks for an imbalance" not in caplog.text  # n_max: the largest class, 30
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_data(cfg, 4, warn=False)  # a distributed run's other ranks
    assert caplog.text == ""


def test_a_short_middle_class_is_warned_though_the_ratio_holds(tmp_path, caplog):
    """Targets 100, 46, 21, 10 with class 1 holding 22 (20 after the carve-out): the counts
    100, 20, 21, 10 keep the ratio 10 asked for, yet class 1 got under half its images."""
    _image_folder(tmp_path, {"train": [102, 22, 30, 30], "test": [2] * 4})
    cfg = DataConfig(dataset="folder", path=str(tmp_path), num_classes=4, n_max=100,
                     imbalance_ratio=10, val_per_class=2)
    with caplog.at_level("WARNING"):
        assert prepare_data(cfg, 4).train_counts == [100, 20, 21, 10]
    assert "the classes give 10: class(es) [1] hold [26] fewer training images" in caplog.text


def test_imbalance_ratio_1_takes_a_long_tailed_folder_as_it_is_without_a_warning(tmp_path,
                                                                                caplog):
    _image_folder(tmp_path, {"train": [40, 20, 10, 5], "test": [2] * 4})
    cfg = DataConfig(dataset="folder", path=str(tmp_path), num_classes=4, imbalance_ratio=1,
                     val_per_class=2)
    with caplog.at_level("WARNING"):
        assert prepare_data(cfg, 4).train_counts == [38, 18, 8, 3]
    assert caplog.text == ""
