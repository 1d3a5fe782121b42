"""What differs between two configs of one run, and which differences a resume may make.

A run's config lives in three places that must agree: ``config.yaml`` (what ``--resume``,
``otlt eval`` and ``otlt probe`` read), the copy inside ``last.pt`` (what the state was
trained with) and the ``--set``/``--data`` of a resume. :func:`config_changes` is the one
comparison of all of them. Both sides are built configs (``build_config``, then
``to_dict``), so a key added to the schema after a run was written takes its default on
both sides and is no difference: an old checkpoint stays loadable.
"""

from __future__ import annotations

from typing import Any

from otlt.config.schema import RunConfig, to_dict
from otlt.errors import OtltError

SAFE_ON_RESUME = ("train.progress", "train.workers", "train.device", "train.eval_batch_size",
                  "train.bn_stack", "train.dist_timeout", "train.compile", "train.cuda_graphs",
                  "data.path")
"""Config keys a resume may change: how the run executes or where its data lives, never what
it computes (``data.path``: the data must give the run's ``splits.json`` again)."""


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}``: a config dict by dotted key (``*.params`` kept whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "params":
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, list[Any]]:
    """The keys whose values differ, ``{key: [old, new]}``, sorted by key."""
    before, after = flat_config(to_dict(old)), flat_config(to_dict(new))
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


def refuse_unsafe_changes(changes: dict[str, list[Any]], what: str, hint: str) -> None:
    """Raise one line ``<what> (key old -> new, ...); a resume may only change ... <hint>``
    when ``changes`` holds a key outside :data:`SAFE_ON_RESUME` (every such key is named)."""
    unsafe = [k for k in changes if k not in SAFE_ON_RESUME]
    if not unsafe:
        return
    listed = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in unsafe[:5])
    if len(unsafe) > 5:
        listed += f", and {', '.join(unsafe[5:])}"
    raise OtltError(f"{what} ({listed}); a resume may only change "
                    f"{', '.join(SAFE_ON_RESUME)}. {hint}")
