"""The committed Table 1 series against today's presets.

Seeds 1 and 2 of a Table 1 row are trained later, on later code, with the preset as it is
then; the report pools them with the committed seed 0 only if the configs agree (but for
``seed``, execution-only keys and the BatchNorm procedure the report reads every run under).
A preset edit that changes training would silently start a new row instead: this test names
it first. The code that trained each run is not part of a config: code changes between seeds
are recorded by the runs' ``sittings.jsonl`` (git commit) and said in the group's README.
README's "Where we stand" table quotes the group's pair differences; tests recompute every
line of it from the runs, and the numbers its prose and the validation-noise paragraph quote.
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


def _group_summaries():
    from otlt.report.rows import row_summary

    runs = [load_run(p) for p in sorted(GROUP.glob("cifar10_lt_r100_*"))
            if (p / "config.yaml").is_file()]
    rows = seed_rows(runs, PROCEDURE_KEYS)
    return {row.label: row_summary(row, "train") for row in rows}


def _standing_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Where we stand\n")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def _standing_prose() -> str:
    """README's "Where we stand" section but its table, whitespace runs made single spaces."""
    section = (ROOT / "README.md").read_text().split("\n## Where we stand\n")[1]
    lines = section.split("\n## ")[0].splitlines()
    return " ".join(" ".join(line for line in lines if not line.startswith("|")).split())


def test_the_readme_standing_table_is_the_reports():
    """Every line of README's "Where we stand" is recomputed from the committed runs, as
    ``otlt report --bn-stats train`` computes its pair tables: seeds both rows have, the mean
    difference at the last epoch with its 95% t interval, at the validation-selected epoch
    and at each run's best test epoch (optimistic), the paper's difference."""
    from otlt.report.rows import format_stat, pair_differences

    summaries = _group_summaries()
    table = _standing_table()
    assert len(table) == 5
    for claim, rows, seeds, last, interval, selected, best, paper in table:
        first, second = (f"cifar10_lt_r100_{name.strip(' `')}" for name in rows.split("−"))
        d = pair_differences(summaries[first], summaries[second])
        n = len(d["seeds"])
        expected_paper = "–" if d["paper"] is None else f"{d['paper']:.2f}"
        expected_interval = ("–" if d["last_interval"] is None
                             else "{:.2f} to {:.2f}".format(*d["last_interval"]))
        assert (seeds, last, interval, selected, best, paper) == (
            ", ".join(map(str, d["seeds"])), format_stat(d["last"], n), expected_interval,
            format_stat(d["selected"], n), format_stat(d["best_test"], n),
            expected_paper), claim


@pytest.mark.parametrize("mixed, base", [("drw_otmix", "drw"), ("erm_otmix", "erm")])
def test_the_readme_interval_for_otmix_gains_is_the_committed_pairs(mixed, base):
    """The Seeds bullet's standard error and 95% t interval of OTmix's gain over its base
    row come from the committed per-seed differences (the report's interval, negated: the
    prose speaks of gains)."""
    import math

    from otlt.report.rows import pair_differences

    summaries = _group_summaries()
    d = pair_differences(summaries[f"cifar10_lt_r100_{mixed}"],
                         summaries[f"cifar10_lt_r100_{base}"])
    _, std, n = d["last"]
    assert n in (2, 3)
    se, (hi, lo) = std / math.sqrt(n), (-x for x in d["last_interval"])
    section = _standing_prose()
    sentence = (f"OTmix over {ROW_NAMES[base]}: the mean's standard error is "
                f"{se:.2f} points on {NUMBER_WORDS[n - 1]} degree{'s' * (n > 2)} of freedom, "
                f"so a 95% t interval ({lo:.1f} to {hi:.1f})")
    assert sentence in section


#: how README's prose names a Table 1 row
ROW_NAMES = {"erm": "ERM", "erm_cmo": "ERM+CMO", "erm_otmix": "ERM+OTmix", "drw": "ERM-DRW",
             "drw_otmix": "DRW+OTmix", "balms": "BALMS", "balms_otmix": "BALMS+OTmix"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty", "twenty-one", "twenty-two"]


def test_the_readme_validation_noise_paragraph_is_the_committed_runs():
    """README's "How noisy the validation-selected epoch is": the number of runs, the range of
    selected-minus-last test error, how many runs lie within 1.0 point of their last epoch,
    and each run outside it by name, all from the committed runs under `train` statistics."""
    summaries = _group_summaries()
    moves = {}  # prose name of the run -> selected - last, rounded as printed
    for label, s in summaries.items():
        for k, last, selected in zip(s["seeds"], s["per_seed"]["last"],
                                     s["per_seed"]["selected"], strict=True):
            name = ROW_NAMES[label.removeprefix("cifar10_lt_r100_")]
            moves[name if len(s["seeds"]) == 1 else f"{name} seed {k}"] = round(
                selected - last, 2)
    text = (ROOT / "README.md").read_text()
    paragraph = text.split("- **How noisy the validation-selected epoch is.**")[1]
    paragraph = " ".join(paragraph.split("\n- ")[0].split())
    outside = {name: d for name, d in moves.items() if abs(d) > 1.0}
    assert f"In the {NUMBER_WORDS[len(moves)]} committed Table 1 runs" in paragraph
    assert (f"ranges from {max(moves.values()):.2f} points worse to "
            f"{-min(moves.values()):.2f} better") in paragraph
    assert (f"within 1.0 point of the last in {NUMBER_WORDS[len(moves) - len(outside)]} "
            "of them") in paragraph
    assert f"The {NUMBER_WORDS[len(outside)]} outside are" in paragraph
    for name, d in outside.items():
        assert f"{name} ({abs(d):.2f} {'better' if d < 0 else 'worse'}" in paragraph, name


def _spoken_list(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def test_the_readme_offsets_from_the_papers_absolute_errors_are_the_committed_rows():
    """The "Absolute errors" bullet: the range of the baselines' (ERM, ERM-DRW, BALMS) row
    mean minus the paper, and each ERM mixing row's, per seed where it has several."""
    summaries = _group_summaries()

    def offsets(row):
        s = summaries[f"cifar10_lt_r100_{row}"]
        return s["stats"]["last"][0] - s["paper"], [e - s["paper"] for e in s["per_seed"]["last"]]

    section = _standing_prose()
    base = [offsets(row)[0] for row in ("erm", "drw", "balms")]
    assert (f"our baselines sit {min(base):.1f} to {max(base):.1f} points above the paper's"
            in section)
    for row in ("erm_cmo", "erm_otmix"):
        mean, per_seed = offsets(row)
        seeds = "" if len(per_seed) == 1 else (
            f"; per seed {_spoken_list([f'{e:.1f}' for e in per_seed])}")
        assert f"{mean:.1f} ({ROW_NAMES[row]}{seeds})" in section, row




#: the committed logit-adjustment diagnostic's files (scripts/logit_adjusted_eval.py)
LOGIT_ADJUSTED_FILES = ("logit_adjusted_last_train.json", "logit_adjusted_last_train_seeds12.json",
                        "logit_adjusted_last_train_cmo_seed1.json")


def _logit_adjusted_records() -> dict[str, dict]:
    import json

    records = {}
    for name in LOGIT_ADJUSTED_FILES:
        for record in json.loads((GROUP / name).read_text())["records"]:
            records[record["run"]] = record
    return records


def _cmo_minus_otmix_adjusted() -> list[float]:
    """ERM+CMO's adjusted test error minus ERM+OTmix's per seed pair (0, 1): the diagnostic of
    the OT plan against random pairing in the features (positive: OTmix's features better)."""
    records = _logit_adjusted_records()
    return [round(records[f"cifar10_lt_r100_erm_cmo{k}"]["test_adjusted_error"]
                  - records[f"cifar10_lt_r100_erm_otmix{k}"]["test_adjusted_error"], 2)
            for k in ("", "_seed1")]


def test_the_readme_cmo_against_otmix_with_the_prior_removed_is_the_committed_diagnostic():
    """The "Do not" bullet: how far apart CMO and OTmix are with the label prior removed, per
    seed pair, and which is behind on each."""
    gaps = _cmo_minus_otmix_adjusted()
    sides = [f"{'behind' if g > 0 else 'ahead'} on seed {k}" for k, g in enumerate(gaps)]
    sentence = (f"two are {_spoken_list([f'{abs(g):.2f}' for g in gaps])} points apart "
                f"(CMO {', '.join(sides)})")
    assert sentence in _standing_prose()


def _logit_adjusted_gains() -> tuple[list[float], list[float]]:
    """ERM+OTmix's gain over ERM per seed pair (0, 1, 2) in the committed logit-adjustment
    diagnostic (scripts/logit_adjusted_eval.py): (plain, adjusted), test error points."""
    records = _logit_adjusted_records()
    gains: tuple[list[float], list[float]] = ([], [])
    for suffix in ("", "_seed1", "_seed2"):
        erm, otmix = (records[f"cifar10_lt_r100_{row}{suffix}"] for row in ("erm", "erm_otmix"))
        for out, key in zip(gains, ("test_plain_error", "test_adjusted_error"), strict=True):
            out.append(round(erm[key] - otmix[key], 2))
    return gains


def test_the_readme_logit_adjusted_gains_are_the_committed_diagnostic():
    """The "Do not" bullet's gains with and without the label prior, per seed pair."""
    import statistics

    plain, adjusted = _logit_adjusted_gains()
    sentence = (f"gain {_spoken_list([f'{g:.2f}' for g in adjusted])} points on the three seed "
                f"pairs ({statistics.mean(adjusted):.2f} ± {statistics.stdev(adjusted):.2f}) "
                f"where they gain {_spoken_list([f'{g:.2f}' for g in plain])} without it")
    assert sentence in _standing_prose()


def test_every_two_decimal_number_in_the_standing_prose_comes_from_the_committed_runs():
    """A typo guard for the prose around the table: each number written with two decimals is
    a run's last, selected or best-test-epoch error, or, over a row's seeds or a pair's
    per-seed differences (either sign), a value, the mean, std, standard error or range, or
    a number of the committed logit-adjustment diagnostic or data calibration. The
    statistics are the report's own (``paired_values``, ``mean_std``)."""
    import itertools
    import re

    from otlt.report.rows import paired_values
    from otlt.report.seedstats import mean_std

    def spread(xs: list[float]) -> set[float]:
        mean, std, n = mean_std(xs)
        found = {*xs, max(xs) - min(xs)} | ({mean} if n else set())
        return found | ({std, std / n ** 0.5} if std is not None else set())

    summaries = _group_summaries()
    values: set[float] = set()
    for s in summaries.values():
        for key in ("last", "selected", "best_test"):
            values |= spread([v for v in s["per_seed"][key] if v is not None])
    for a, b in itertools.permutations(summaries.values(), 2):
        common = [k for k in a["seeds"] if k in b["seeds"]]
        for key in ("last", "selected", "best_test"):
            diffs = [v for v in paired_values(a, b, key, common) if v is not None]
            if diffs:
                values |= spread(diffs)
    plain, adjusted = _logit_adjusted_gains()
    values |= {*plain, *spread(adjusted), *_cmo_minus_otmix_adjusted(), *_calibration_numbers()}
    allowed = {f"{abs(v):.2f}" for v in values}
    quoted = set(re.findall(r"(?<![\d.])\d+\.\d\d(?![\d.])", _standing_prose()))
    assert quoted - allowed == set()


CALIBRATION = ROOT / "results" / "cifar10_balanced_calibration"


def _calibration_numbers() -> set[float]:
    """The committed calibration seeds' last and best-test-epoch errors, their means, the
    seeds' gap and both handicaps (scripts/calibration_verdict.py's numbers); empty before."""
    import json

    from conftest import load_script

    script = load_script("calibration_verdict")
    runs = [run for run in (CALIBRATION / "cifar10_balanced_erm",
                            CALIBRATION / "cifar10_balanced_erm_seed1")
            if (run / "eval.json").is_file()]
    last = [json.loads((run / "eval.json").read_text())["top1_error"] for run in runs]
    best = [script.best_test_error(run) for run in runs]
    values = {*last, *best}
    if len(runs) == 2:
        e, b = sum(last) / 2, sum(best) / 2
        values |= {e, b, last[0] - last[1], e - script.REFERENCE, b - script.REFERENCE}
    return values


def test_the_readme_data_handicap_is_the_committed_calibration(monkeypatch):
    """Once both calibration seeds are committed, README's "Absolute errors" bullet quotes
    the pre-registered verdict and handicap exactly as scripts/calibration_verdict.py reads
    them from the runs (skipped until then: the rule reads two seeds)."""
    import json

    from conftest import load_script

    runs = [CALIBRATION / name for name in ("cifar10_balanced_erm", "cifar10_balanced_erm_seed1")]
    if not all((run / "eval.json").is_file() for run in runs):
        pytest.skip("the data calibration has not committed both seeds yet")
    script = load_script("calibration_verdict", monkeypatch)
    errors = [json.loads((run / "eval.json").read_text())["top1_error"] for run in runs]
    prose = _standing_prose()
    assert script.verdict(errors) in prose
    assert script.handicap(errors, [script.best_test_error(run) for run in runs]) in prose
