"""Check that a refactor left training unchanged: the same short run at two git revisions,
compared bit for bit (every metrics.jsonl entry but the timings, every weight of last.pt).

    python scripts/same_trajectory.py OLD_REV [NEW_REV]        # NEW_REV: the working tree
    python scripts/same_trajectory.py OLD_REV --set eval.bn_stats=train   # more overrides

The run is the OTmix short preset on 400 images per head class for 3 epochs with mixing on
from the first epoch (an OT epoch included), one torch thread: it exercises the augment ->
coin -> partners -> plan draw order that every committed result depends on. Both runs use
this machine, so bf16 and kernel choices are the same; exit code 0 when identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from otlt.cli.parser import set_flags
from otlt.data.sources import find_data
from otlt.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The preset's milestones and plan epoch lie past 3 epochs (no effect there; refused since).
OVERRIDES = ["data.n_max=400", "optim.epochs=3", "optim.milestones=[]", "optim.gammas=[]",
             "mix.params.plan_epochs=[]", "mix.skip_first=0", "mix.skip_last=0",
             "train.progress=false", "eval.bn_probe_every=0", "train.keep_epochs=[]"]


def train(source: Path, out: Path, data: Path, extra: list[str]) -> Path:
    sets = set_flags([*OVERRIDES, *extra, f"out_dir={out}", "name=r", f"data.path={data}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(source / "src")}
    subprocess.run([sys.executable, "-m", "otlt", "train", "--config",
                    "configs/cifar10_lt_r100_erm_otmix_short.yaml", *sets],
                   cwd=source, env=env, check=True, stdout=subprocess.DEVNULL)
    return out / "r"


def differences(a: Path, b: Path) -> list[str]:
    def records(run: Path) -> list[dict]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    out = [f"epoch {x.get('epoch')}: {k}: {x.get(k)!r} != {y.get(k)!r}"
           for x, y in zip(records(a), records(b), strict=True)
           for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    wa, wb = (load_checkpoint(run / "last.pt")["model"] for run in (a, b))
    out += [f"weight {k} differs" for k in wa if not torch.equal(wa[k], wb[k])]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="git revision before the change")
    parser.add_argument("new", nargs="?", help="git revision after (default: working tree)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="another config override for both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="otlt-same-") as tmp:
        tmp = Path(tmp)
        trees = []
        for i, rev in enumerate([args.old, args.new]):
            if rev is None:
                trees.append(ROOT)
                continue
            tree = tmp / f"tree{i}"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT,
                           check=True, capture_output=True)
            trees.append(tree)
        try:
            data = find_data("cifar10").resolve()  # found from here, given to both trees
            runs = [train(tree, tmp / f"out{i}", data, args.overrides)
                    for i, tree in enumerate(trees)]
            found = differences(*runs)
        finally:
            for tree in trees:
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)],
                                   cwd=ROOT, capture_output=True)
    print("\n".join(found) if found else "identical: metrics.jsonl (but timings) and last.pt")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
