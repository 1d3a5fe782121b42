import dataclasses
import json
import re
from pathlib import Path

import pytest

from otlt.config import (
    apply_overrides,
    build_config,
    dump_config,
    load_config,
    load_raw,
    mixer_params,
)
from otlt.errors import OtltError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_builds_its_loss_and_mixer():
    from otlt.losses import create_loss
    from otlt.mixing import create_mixer

    paths = sorted(CONFIGS.glob("*.yaml"))
    assert len(paths) > 100, "configs missing: run configs/make_configs.py"
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem, f"{path.name}: name {cfg.name!r} differs from file name"
        counts = [100 - 9 * k for k in range(cfg.num_classes // 10 * 10)][: cfg.num_classes]
        counts = [max(c, 1) for c in counts]
        create_loss(cfg.loss.name, counts, **cfg.loss.params)
        if cfg.mix.name != "none":  # the params as the engine passes them (epochs resolved)
            create_mixer(cfg.mix.name, class_counts=counts, fraction=cfg.mix.fraction,
                         **mixer_params(cfg))


def test_short_twin_inherits_and_overrides():
    full = load_config(CONFIGS / "cifar10_lt_r100_erm.yaml")
    short = load_config(CONFIGS / "cifar10_lt_r100_erm_short.yaml")
    assert full.optim.epochs == 240 and short.optim.epochs == 30
    assert short.optim.lr == full.optim.lr and short.data == full.data


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.epochs=7", "optim.milestones=[2, 4]",
                             "optim.gammas=[0.1, 0.01]", "data.imbalance_ratio=50"])
    assert cfg.optim.epochs == 7 and cfg.optim.milestones == (2, 4)
    assert cfg.data.imbalance_ratio == 50.0


@pytest.mark.parametrize("override,match", [
    ("optim.epochz=3", "unknown config key optim.epochz"),
    ("bogus=1", "unknown config key bogus"),
    ("data.imbalance_ratio=abc", "data.imbalance_ratio must be a number"),
    ("data.imbalance_ratio=0.5", "imbalance_ratio must be a number >= 1"),
    ("optim.batch_size=0", "batch_size must be a positive integer"),
    ("optim.batch_size=-3", "batch_size must be a positive integer"),
    ("optim.epochs=2.5", "optim.epochs must be an integer"),
    ("noequals", "must look like key=value"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(OtltError, match=match):
        load_config(None, [override])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(CONFIGS / "cifar10_lt_r100_drw.yaml", ["seed=3"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert build_config(load_raw(tmp_path / "c.yaml")) == cfg


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(OtltError, match="does not exist"):
        load_raw(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(OtltError, match="not valid YAML"):
        load_raw(bad)


def test_apply_overrides_does_not_mutate_input():
    raw = {"optim": {"epochs": 3}}
    apply_overrides(raw, ["optim.epochs=5"])
    assert raw == {"optim": {"epochs": 3}}


def test_readme_lists_every_config_key_as_the_code_defines_it():
    import re
    from pathlib import Path

    from otlt.config import config_keys_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- config-keys:start -->\n(.*?)\n<!-- config-keys:end -->", readme,
                      re.S)
    assert block, "README lost its config key list"
    assert block.group(1) == config_keys_markdown(), \
        "README's config keys differ from otlt.config (paste config_keys_markdown())"


RESULTS = CONFIGS.parent / "results"
# Smoke tests from before the presets dropped their meta split (their README says so).
PREDATE_THE_PRESETS = {"cifar10_lt_r100_short"}


def committed_runs_of_presets() -> list[Path]:
    return [path.parent for path in sorted(RESULTS.glob("*/*/config.yaml"))
            if (CONFIGS / f"{load_raw(path)['name']}.yaml").is_file()
            and path.parent.parent.name not in PREDATE_THE_PRESETS]


def test_a_preset_trains_the_images_of_its_committed_results():
    """A preset run on the same dataset reproduces a committed row's splits exactly: the
    data section (everything that chooses images: ratio, profile, carve-outs, data seed)
    is the preset's, and the splits it draws have the committed counts."""
    import numpy as np

    from otlt.data.longtail import build_splits

    runs = committed_runs_of_presets()
    assert len(runs) >= 10
    for run in runs:
        committed = load_config(run / "config.yaml")
        preset = load_config(CONFIGS / f"{committed.name}.yaml")
        assert dataclasses.replace(committed.data, path=preset.data.path) == preset.data, run
        counts = json.loads((run / "splits.json").read_text())["counts"]
        k = committed.num_classes
        labels = np.repeat(np.arange(k), 50000 // k)  # CIFAR's balanced training set
        d = preset.data
        splits = build_splits(labels, k, imbalance_ratio=d.imbalance_ratio, n_max=50000 // k,
                              profile=d.profile, val_per_class=d.val_per_class,
                              meta_per_class=d.meta_per_class, data_seed=d.data_seed)
        assert splits.train_counts == counts["train"], run
        assert np.bincount(labels[splits.meta], minlength=k).tolist() == counts["meta"], run


def test_a_shortened_preset_is_refused_in_one_line_whose_fix_loads():
    """`--set optim.epochs=60` on ERM-DRW + OTmix: milestones 100/160/200 and DRW from 160
    would silently make it ERM at lr 0.1. One line names every knob past the run and scaled
    values; with them the preset loads, keeping the last mixing epoch and the last."""
    from otlt.config import mixer_params, resolve_epochs

    preset = CONFIGS / "cifar100_lt_r100_drw_otmix.yaml"
    with pytest.raises(OtltError) as info:
        load_config(preset, ["optim.epochs=60"])
    message = str(info.value)
    assert "\n" not in message
    for needle in ("optim.milestones=[100,160,200]", "loss.params.drw_epoch=160",
                   "optim.epochs=60", "--set optim.milestones=[25,40,50]",
                   "--set loss.params.drw_epoch=40"):
        assert needle in message, (needle, message)
    cfg = load_config(preset, ["optim.epochs=60", *re.findall(r"--set (\S+)", message)])
    assert resolve_epochs(cfg.train.keep_epochs, 60) == (56, 59)  # skip_last 3, the last
    assert mixer_params(cfg)["plan_epochs"] == [40]
    full = load_config(preset)  # the 240-epoch preset means what its committed runs mean
    assert resolve_epochs(full.train.keep_epochs, 240) == (236, 239)
    assert mixer_params(full)["plan_epochs"] == [220]


@pytest.mark.parametrize("overrides,needle", [
    (["optim.epochs=150", "optim.milestones=[50]", "optim.gammas=[0.1]", "loss.name=drw",
      "loss.params.drw_epoch=160"], "loss.params.drw_epoch=160 reach past optim.epochs=150"),
    (["optim.epochs=10", "optim.milestones=[5,10]", "optim.gammas=[0.1,0.01]"],
     "optim.milestones=[5,10] reach past optim.epochs=10"),  # epoch 10 is never trained
    (["optim.epochs=10", "optim.milestones=[]", "optim.gammas=[]", "train.keep_epochs=[-11]"],
     "--set train.keep_epochs=[-10]"),
    (["optim.epochs=10", "optim.milestones=[]", "optim.gammas=[]", "mix.name=otmix",
      "mix.params.plan_epochs=[10]"], "mix.params.plan_epochs=[10] reach past"),
])
def test_epochs_past_the_run_are_refused(overrides, needle):
    with pytest.raises(OtltError, match=re.escape(needle)):
        load_config(None, overrides)


def test_a_shortened_short_preset_gets_a_fix_scaled_from_its_own_length():
    """A _short preset's knobs are written for 30 epochs: scaled by 15/240 the fix put every
    milestone at 0-2 (the learning rate gone after one epoch) and DRW at epoch 1."""
    with pytest.raises(OtltError) as info:
        load_config(CONFIGS / "cifar10_lt_r100_drw_short.yaml", ["optim.epochs=15"])
    message = str(info.value)
    assert "--set optim.milestones=[6,10,12] --set loss.params.drw_epoch=10 (scaled by " \
           "15/30;" in message
    load_config(CONFIGS / "cifar10_lt_r100_drw_short.yaml", [
        "optim.epochs=15", "optim.milestones=[6,10,12]", "loss.params.drw_epoch=10"])
    with pytest.raises(OtltError, match=re.escape("scaled by 60/240;")):
        load_config(CONFIGS / "cifar10_lt_r100_drw.yaml", ["optim.epochs=60"])


def test_otlt_train_scales_the_fix_from_the_presets_own_length(capsys):
    """otlt train --preset / --config built the config without the file's length: the fix
    for a _short preset at 3 epochs was scaled by 3/240 (milestones [0,0,0])."""
    from otlt.cli import main

    for source in (["--preset", "cifar10_lt_r100_drw_short"],
                   ["--config", str(CONFIGS / "cifar10_lt_r100_drw_short.yaml")]):
        assert main(["train", *source, "--set", "optim.epochs=15"]) == 2
        assert "--set optim.milestones=[6,10,12] --set loss.params.drw_epoch=10 (scaled by " \
               "15/30;" in capsys.readouterr().err


def test_the_losses_default_drw_start_is_checked_by_the_preflight_not_the_config():
    """The config does not import the losses: ``loss.name=drw`` with its default start (160)
    loads, and the engine's preflight, which builds the loss before any data is read, refuses
    the start past the run in the config's one line."""
    from otlt.engine.preflight import check_components

    cfg = load_config(None, ["optim.epochs=150", "optim.milestones=[50]", "optim.gammas=[0.1]",
                             "loss.name=drw"])
    with pytest.raises(OtltError) as info:
        check_components(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "loss.params.drw_epoch=160 reach past optim.epochs=150 (epochs count from 0;")
    assert "--set loss.params.drw_epoch=100 (scaled by 150/240;" in message
    check_components(load_config(None, ["optim.epochs=150", "optim.milestones=[50]",
                                        "optim.gammas=[0.1]", "loss.name=drw",
                                        "loss.params.drw_epoch=100"]))
    ldam = load_config(None, ["optim.epochs=150", "optim.milestones=[50]",
                              "optim.gammas=[0.1]", "loss.name=ldam_drw"])
    with pytest.raises(OtltError, match=re.escape("loss.params.drw_epoch=160 reach past")):
        check_components(ldam)


def test_epochs_count_from_the_end_and_unused_milestones_pass():
    from otlt.config import mixer_params, resolve_epochs

    cfg = load_config(None, ["optim.epochs=10", "optim.schedule=cosine",  # milestones unused
                             "train.keep_epochs=[-1, 0, 9]", "mix.name=otmix",
                             "mix.params.plan_epochs=[-10, -2]"])
    assert resolve_epochs(cfg.train.keep_epochs, 10) == (0, 9)
    assert mixer_params(cfg)["plan_epochs"] == [0, 8]
    assert cfg.train.keep_epochs == (-1, 0, 9)  # the config keeps what was written
