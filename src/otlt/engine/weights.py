"""Weight files that cannot carry code: ``kept/epoch_<NNN>``, ``best``, committed results.

One format for every file of weights the engine writes besides the resume state
(``last.pt``): safetensors, which holds named tensors and a string header only. A file holds

- ``model/<key>``: the model's state dict as it trained (BatchNorm running statistics as
  the training batches left them, so any ``eval.bn_stats`` procedure can be re-derived);
- ``evaluated_bn/<key>`` (optional): the BatchNorm buffers the model was evaluated with
  (``best``: the procedure of ``eval.bn_stats``), so the file is usable as is;
- ``mixer/<key>`` (optional): the mixer's tensor state as the epoch trained with it
  (OTmix's validation confusion matrix), needed to draw ``train`` recalibration batches;
- a JSON header ``otlt``: epoch, and whatever the writer adds (procedure, selected metric).

``dtype=torch.float16`` halves the size for committed results (ResNet-32: 0.93 MB); floating
tensors are read back as float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from otlt.atomic import write_atomic
from otlt.config import TrainConfig, resolve_epochs
from otlt.engine.checkpoint import load_checkpoint
from otlt.errors import OtltError, reason

SUFFIX = ".safetensors"
_SECTIONS = ("model", "evaluated_bn", "mixer")


@dataclass
class WeightsFile:
    """What :func:`load_weights` returns (tensors on the CPU, floating ones float32)."""

    model: dict[str, torch.Tensor]
    epoch: int
    evaluated_bn: dict[str, torch.Tensor] = field(default_factory=dict)
    mixer: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def evaluated_model(self) -> dict[str, torch.Tensor]:
        """The model state with the evaluated BatchNorm buffers in place (if any)."""
        return {**self.model, **self.evaluated_bn}


def save_weights(path: Path, model: dict[str, torch.Tensor], *, epoch: int,
                 evaluated_bn: dict[str, torch.Tensor] | None = None,
                 mixer: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None, parents: bool = False) -> None:
    """Write a weight file atomically (temp file + rename). Non-tensor mixer entries (and
    None) are skipped; ``dtype`` casts floating tensors (None: keep); ``parents``: create
    the missing folders first."""
    tensors: dict[str, torch.Tensor] = {}
    for section, state in (("model", model), ("evaluated_bn", evaluated_bn or {}),
                           ("mixer", mixer or {})):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[f"{section}/{key}"] = t.contiguous()
    header = {"otlt": json.dumps({"epoch": int(epoch), **(meta or {})})}
    payload = save(tensors, metadata=header)
    write_atomic(Path(path), lambda handle: handle.write(payload), parents=parents)


def keep_epoch_weights(run_dir: Path, train: TrainConfig, epochs: int, epoch: int,
                       model: torch.nn.Module, mixer_state: dict[str, Any] | None) -> None:
    """Keep ``model``'s weights (BN buffers as trained) after ``epoch`` when ``train.keep_epochs``
    (-1: the last of ``epochs``) or every ``train.keep_every`` epochs ask for it, as
    ``run_dir/kept/epoch_<NNN>.safetensors`` with the mixer state the epoch trained with, so
    ``otlt eval`` can evaluate them under any procedure."""
    wanted = epoch in resolve_epochs(train.keep_epochs, epochs) or \
        (train.keep_every and (epoch + 1) % train.keep_every == 0)
    if not wanted:
        return
    save_weights(Path(run_dir) / "kept" / f"epoch_{epoch:03d}{SUFFIX}", model.state_dict(),
                 epoch=epoch, mixer=mixer_state, parents=True)


def _open(path: Path, read: Callable[[Any], Any]) -> tuple[int, dict[str, Any], Any]:
    """``(epoch, otlt metadata without the epoch, read(handle))`` of a :func:`save_weights`
    file; a missing or bad file raises :class:`OtltError`."""
    path = Path(path)
    if not path.is_file():
        raise OtltError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            content = read(handle)
        meta = json.loads(header["otlt"])
        epoch = int(meta.pop("epoch"))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise OtltError(f"weights file {path} is corrupt or not an otlt weights file "
                        f"({reason(exc, 120)})") from None
    return epoch, meta, content


def weights_epoch(path: Path) -> int:
    """The epoch a :func:`save_weights` file holds, from its header alone (no tensor read)."""
    return _open(path, lambda handle: None)[0]


def load_weights(path: Path) -> WeightsFile:
    """Read a file written by :func:`save_weights`; a bad file raises :class:`OtltError`."""
    epoch, meta, tensors = _open(path, lambda handle: {key: handle.get_tensor(key)
                                                       for key in handle.keys()})  # noqa: SIM118
    sections: dict[str, dict[str, torch.Tensor]] = {s: {} for s in _SECTIONS}
    for key, value in tensors.items():
        section, _, name = key.partition("/")
        if section in sections:
            sections[section][name] = value.float() if value.is_floating_point() else value
    return WeightsFile(model=sections["model"], epoch=epoch,
                       evaluated_bn=sections["evaluated_bn"], mixer=sections["mixer"], meta=meta)


def read_weights(path: Path) -> WeightsFile:
    """Weights from a ``.safetensors`` file or from an engine checkpoint (``last.pt``, or a
    ``kept/epoch_<NNN>.pt`` of runs made before weights were safetensors)."""
    path = Path(path)
    if path.suffix == SUFFIX:
        return load_weights(path)
    return checkpoint_weights(load_checkpoint(path))


def checkpoint_weights(state: dict[str, Any]) -> WeightsFile:
    """The weights (model, epoch, tensor mixer state) of a checkpoint read already."""
    mixer = {k: v for k, v in (state.get("mixer") or {}).items() if isinstance(v, torch.Tensor)}
    return WeightsFile(model=state["model"], epoch=int(state["epoch"]), mixer=mixer)


def _names(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def state_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str:
    """What keeps ``given`` (a saved state dict) from loading into a module whose state dict
    is ``expected``: the first missing and unexpected keys and differing shapes, by name
    (``""`` when they fit). Torch's own message puts the names on lines a one-line error
    would drop."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {list(given[k].shape)} in the file, {list(v.shape)} here"
              for k, v in expected.items()
              if k in given and getattr(v, "shape", None) is not None
              and getattr(given[k], "shape", v.shape) != v.shape]
    parts = [f"{label} {_names(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected),
              ("shapes", shapes)) if keys]
    return "; ".join(parts)


def load_model_state(model: torch.nn.Module, state: dict[str, Any], failure: str) -> None:
    """``model.load_state_dict(state)`` (strict); a state that does not fit raises
    :class:`OtltError` starting with ``failure`` and naming the keys (:func:`state_mismatch`)."""
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        raise OtltError(f"{failure}: {mismatch}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise OtltError(f"{failure} ({reason(exc)})") from None


__all__ = ["SUFFIX", "WeightsFile", "checkpoint_weights", "keep_epoch_weights",
           "load_model_state", "load_weights",
           "read_weights", "save_weights", "state_mismatch", "weights_epoch"]
