"""The committed Table 1 series against today's presets.

Seeds 1 and 2 of a Table 1 row are trained later, on later code, with the preset as it is
then; the report pools them with the committed seed 0 only if the preset still trains what
seed 0 trained (configs equal but for ``seed``, execution-only keys and the BatchNorm
procedure the report reads every run under). A preset edit that changes training would
silently start a new row instead: this test names it first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from otlt.config import load_config, to_dict
from otlt.report.rows import PROCEDURE_KEYS, seed_rows
from otlt.report.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
GROUP = ROOT / "results" / "cifar10_lt_r100_table1"
#: the command of the group's README (results/collect.sh), for seed k > 0
SEED_COMMAND = ["out_dir=runs/table1", "data.meta_per_class=0", "eval.test_every_epoch=true",
                "train.progress=false", "data.path=cifar10-jpeg.zip"]
SEED0_RUNS = sorted(p.name for p in GROUP.glob("cifar10_lt_r100_*")
                    if (p / "config.yaml").is_file() and "_seed" not in p.name)


def test_the_group_has_its_seed0_rows():
    assert len(SEED0_RUNS) == 7, SEED0_RUNS


@pytest.mark.parametrize("name", SEED0_RUNS)
def test_todays_preset_with_another_seed_pools_with_the_committed_seed0(tmp_path, name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml",
                      [*SEED_COMMAND, "seed=1", f"name={name}_seed1"])
    run = tmp_path / f"{name}_seed1"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    rows = seed_rows([load_run(GROUP / name), load_run(run)], PROCEDURE_KEYS)
    assert [(r.label, r.seeds) for r in rows] == [(name, [0, 1])]
