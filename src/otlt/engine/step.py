"""What one training step takes and does: the batch a feed yields and the step that the trainer
calls on it.

A step object is what the trainer composes instead of being subclassed: :class:`SGDStep` (one
SGD step of the classifier on a clean or mixed batch, every method but OT re-weighting's stage 2)
and :class:`otlt.engine.reweight_stage.Stage2Step`. Both answer the :class:`Step` protocol:
``start_epoch`` before an epoch's first batch, ``__call__`` per batch, ``end_epoch`` for the
epoch's record, ``state_dict``/``load_state_dict`` for what ``last.pt`` must carry beyond the
model and optimizer, and ``write`` for files beside ``last.pt``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from otlt.amp import autocast
from otlt.engine.stability import backward_step
from otlt.losses import LongTailLoss, batch_loss
from otlt.mixing import MixedBatch

StepResult = tuple[torch.Tensor, torch.Tensor, int]


@dataclass
class TrainBatch:
    """One training step's input on this rank.

    ``images (B, 3, H, W)`` float, augmented; ``labels (B,)`` long; ``indices (B,)`` their
    training-split indices (None when streamed); ``mixed`` the recipe's mix of them (None: a
    clean step).
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None
    mixed: MixedBatch | None = None

    @property
    def model_input(self) -> torch.Tensor:
        """What the model sees: the mixed images, or the clean ones on a clean step."""
        return self.images if self.mixed is None else self.mixed.images


class EpochBatches:
    """A sized iterable of an epoch's batches: ``make(item)`` for each of ``items`` (the
    epoch's global index batches, or a streaming loader's items), called lazily, after the
    previous batch's step was taken (a feature pass sees the model as stepped)."""

    def __init__(self, items: Sequence[Any], make: Callable[[Any], TrainBatch]) -> None:
        self.items, self.make = items, make

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[TrainBatch]:
        return (self.make(item) for item in self.items)


class Step(Protocol):
    """What the trainer calls (see the module docstring). ``__call__`` returns the batch's
    summed loss and summed correct predictions as device tensors (no host synchronisation)
    and its size."""

    def start_epoch(self, generator: torch.Generator) -> None: ...

    def __call__(self, batch: TrainBatch) -> StepResult: ...

    def end_epoch(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def write(self, run_dir: Path, epoch: int) -> None: ...


def cudagraph_counters() -> dict[str, int]:
    """This process's CUDA-graph counters of ``torch.compile`` (``mode="reduce-overhead"``),
    inductor's own, since the process started:

    - ``cuda_graph_skips``: a compiled graph ran without CUDA graphs (a CPU tensor, a mutated
      input, an op that cannot be captured...), counted per fallback, so a graph that keeps
      falling back (e.g. past torch's re-record limit) counts again at every call;
    - ``cuda_graph_partitions``: graphs that inductor split into partitions (torch's graph
      partitioning, on by default in recent releases), so that the ops between partitions
      run outside CUDA graphs; the partitions of each split graph are counted (0: every
      compiled graph is replayed whole).

    The skip's message goes to the ``cudagraphs`` log artifact, off by default
    (``TORCH_LOGS=cudagraphs``), so the counters are the reliable witness; both 0 where
    torch keeps no counters."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without the counters
        return {"cuda_graph_skips": 0, "cuda_graph_partitions": 0}
    inductor = counters["inductor"]
    return {"cuda_graph_skips": int(inductor["cudagraph_skips"]),
            "cuda_graph_partitions": int(inductor["cudagraph_partitions"])}


def counters_since(before: dict[str, int]) -> dict[str, int]:
    """:func:`cudagraph_counters` now minus ``before`` (an earlier reading)."""
    now = cudagraph_counters()
    return {k: now[k] - before.get(k, 0) for k in now}


class SGDStep:
    """One SGD step of ``step_model`` (the model, compiled or wrapped in DDP) on a batch:
    ``loss`` on the clean labels, or on a mixed batch
    ``L = Σ λ_i ℓ(f(x̃_i), a_i) + (1 - λ_i) ℓ(f(x̃_i), b_i)`` normalised as
    :func:`otlt.losses.batch_loss` says; its accuracy counts a mixed row as
    ``λ_i [pred = a_i] + (1 - λ_i) [pred = b_i]``. ``graphs``: ``step_model`` replays CUDA
    graphs (``train.cuda_graphs``); each step begins a new graph iteration, so no output of
    the previous one is read after it is overwritten, and every epoch's record carries
    ``cuda_graph_skips`` and ``cuda_graph_partitions`` since the step was built
    (:func:`cudagraph_counters`; both 0 when every step replays whole graphs), with one
    warning the first time a graph ran without CUDA graphs."""

    def __init__(self, step_model: torch.nn.Module, loss: LongTailLoss,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 amp_dtype: torch.dtype | None, channels_last: bool,
                 graphs: bool = False) -> None:
        self.step_model, self.loss, self.optimizer = step_model, loss, optimizer
        self.scaler, self.amp_dtype, self.channels_last = scaler, amp_dtype, channels_last
        self.graphs = graphs
        self._counters_before = cudagraph_counters() if graphs else {}
        self._warned = False

    def start_epoch(self, generator: torch.Generator) -> None:
        """Nothing to do before an epoch."""

    def __call__(self, batch: TrainBatch) -> StepResult:
        mixed, y, x = batch.mixed, batch.labels, batch.model_input
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(x.device, self.amp_dtype):
            logits = self.step_model(x)
        if mixed is None:
            loss = batch_loss(self.loss, logits, y)
            correct = (logits.argmax(1) == y).sum()
        else:
            loss = batch_loss(self.loss, logits, mixed.base_labels, mixed.partner_labels,
                              mixed.lam)
            pred = logits.argmax(1)
            correct = (mixed.lam * (pred == mixed.base_labels)
                       + (1 - mixed.lam) * (pred == mixed.partner_labels)).sum()
        backward_step(self.optimizer, loss, self.scaler)
        return loss.detach() * len(y), correct.detach().float(), len(y)

    def end_epoch(self) -> dict[str, Any]:
        if not self.graphs:
            return {}
        counts = counters_since(self._counters_before)
        if counts["cuda_graph_skips"] and not self._warned:
            self._warned = True
            print(f"otlt: warning: train.cuda_graphs: torch.compile fell back from CUDA graphs "
                  f"{counts['cuda_graph_skips']} time(s) (TORCH_LOGS=cudagraphs prints why): "
                  "those calls pay their kernel launches as eager ones do; cuda_graph_skips "
                  "in metrics.jsonl counts them", file=sys.stderr, flush=True)
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing beyond the trainer's model, optimizer and loss."""

    def write(self, run_dir: Path, epoch: int) -> None:
        """No files of its own."""


__all__ = ["EpochBatches", "SGDStep", "Step", "StepResult", "TrainBatch",
           "counters_since", "cudagraph_counters"]
