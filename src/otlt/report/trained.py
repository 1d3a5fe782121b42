"""What needs a trained model and the dataset: the mixed-image gallery and the t-SNE."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otlt.config import RunConfig, build_config
from otlt.data.augment import eval_transform
from otlt.data.prepare import LongTailedData, prepare_data
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.evaluation import evaluate
from otlt.engine.runtime import DeviceSplit
from otlt.errors import OtltError, require
from otlt.mixing import MixRecipe
from otlt.models import create_model

# ---------------------------------------------------------------------- from checkpoints


def load_trained(run_dir: Path, data_path: str | None = None, device: str = "cpu"
                 ) -> tuple[RunConfig, dict[str, Any], LongTailedData, torch.nn.Module]:
    """Load a run's config, checkpoint, data and model (eval mode) for gallery and t-SNE."""
    state = load_checkpoint(Path(run_dir) / "last.pt", map_location=device)
    cfg = build_config(state["config"])
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data_path)))
    data = prepare_data(cfg.data, cfg.num_classes)
    model = create_model(cfg.model.name, cfg.num_classes, head=cfg.model.head)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return cfg, state, data, model


@dataclass
class Gallery:
    """Mixed pairs drawn as in training: images ``(N, H, W, 3)`` floats in [0, 1]; the
    partners are CMO's and OTmix's foregrounds, the bases their backgrounds."""

    partners: np.ndarray
    bases: np.ndarray
    mixed: np.ndarray
    partner_labels: list[int]
    base_labels: list[int]
    lams: list[float]
    ot: bool


def mixed_pairs(run_dir: Path, n: int = 8, data_path: str | None = None, seed: int = 0,
                device: str = "cpu") -> Gallery:
    """Mix one base (background) batch (uniform) with one class-weighted partner (foreground)
    batch through the run's own mixer and trained model, as a training step would, and
    return ``n`` of the resulting (partner, chosen base, mixed) triples.

    The mixer and the partner draw are the run's recipe (:meth:`MixRecipe.from_config`:
    ``mix.params``, ``mix.fraction``, ``mix.sampler_r``); OTmix with ``ot_probability = 1``
    (an OT epoch) and the confusion matrix of the trained model on the validation split
    (eq. 6). Every batch drawn is mixed (no window, no coin).
    Images are not augmented, so the pictures show the dataset's images; the plan is made
    on normalised images (what the model sees) and applied to the displayable ones.
    """
    cfg, state, data, model = load_trained(run_dir, data_path, device)
    require(cfg.mix.name != "none", f"--gallery needs a mixing run; {run_dir} has mix.name none")
    generator = torch.Generator().manual_seed(seed)
    recipe, ot_epoch = _trained_recipe(cfg, state["train_counts"], model, data, device,
                                       generator)
    mixer = recipe.mixer
    (x_base, y_base), partner_batch = _draw_batches(cfg, data, recipe, device, generator)
    x_partner, y_partner = partner_batch if partner_batch is not None else (None, None)
    context = {"model": model, "amp_dtype": None} if mixer.uses_context else {}
    with torch.no_grad():
        plan = mixer.plan(eval_transform(x_base), y_base,
                          None if x_partner is None else eval_transform(x_partner),
                          y_partner, generator=generator, **context)
        mixed = mixer.apply(plan, _unit(x_base), y_base,
                            None if x_partner is None else _unit(x_partner), y_partner)
    rows = _pick_rows(plan.mixed, mixed.partner_labels, n)
    partner = _unit(x_base if x_partner is None else x_partner)
    take = rows.to(device)
    return Gallery(partners=_hwc(partner[plan.partner_index[rows].to(device)]),
                   bases=_hwc(_unit(x_base)[plan.base_index[rows].to(device)]),
                   mixed=_hwc(mixed.images[take]),
                   partner_labels=mixed.partner_labels[take].tolist(),
                   base_labels=mixed.base_labels[take].tolist(), lams=mixed.lam[take].tolist(),
                   ot=ot_epoch)


def _trained_recipe(cfg, train_counts: Sequence[int], model: torch.nn.Module, data,
                    device: str, generator: torch.Generator) -> tuple[MixRecipe, bool]:
    """The run's recipe, its mixer in the state of a late OT epoch: validation confusion of
    the trained model (OTmix's ``F``), ``ot_probability = 1``; and whether the mixer is in
    its special mode (``Mixer.set_epoch``'s answer: OTmix's OT pairing)."""
    params = {"ot_probability": 1.0} if cfg.mix.name == "otmix" else {}
    recipe = MixRecipe.from_config(cfg, data.train.labels, train_counts, **params)
    mixer = recipe.mixer
    assert mixer is not None
    if mixer.needs_confusion and len(data.val):
        confusion = evaluate(model, DeviceSplit(data.val, torch.device(device)), cfg.num_classes,
                             cfg.train.eval_batch_size, None, channels_last=False)
        mixer.update_confusion(confusion)
    special = mixer.set_epoch(cfg.optim.epochs - 1, cfg.optim.epochs, generator=generator)
    return recipe, special


def _draw_batches(cfg, data, recipe: MixRecipe, device: str, generator: torch.Generator):
    """A uniform base (background) batch and, for CMO/OTmix, the recipe's class-weighted
    partner (foreground) batch (``q_k ∝ n_k^-r``, ``r = mix.sampler_r``), as uint8
    ``(B, H, W, 3)`` and labels."""
    train = DeviceSplit(data.train, torch.device(device))
    size = min(cfg.optim.batch_size, len(train))
    base = torch.randperm(len(train), generator=generator)[:size].to(device)
    if not recipe.needs_partner_batch:
        return (train.images[base], train.labels[base]), None
    partner = recipe.draw_partners(size, generator).to(device)
    return ((train.images[base], train.labels[base]),
            (train.images[partner], train.labels[partner]))


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1], for display."""
    return images.permute(0, 3, 1, 2).float() / 255.0


def _hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).cpu().numpy()


def _pick_rows(mixed: torch.Tensor, partner_labels: torch.Tensor, n: int) -> torch.Tensor:
    """Up to ``n`` mixed rows, one per partner class first, so the gallery is varied."""
    candidates = torch.nonzero(mixed.cpu()).flatten().tolist()
    labels = partner_labels.cpu().tolist()
    chosen, seen = [], set()
    for i in candidates:
        if labels[i] not in seen:
            chosen.append(i)
            seen.add(labels[i])
    chosen += [i for i in candidates if i not in chosen]
    require(bool(chosen), "the mixer mixed no row of the sampled batch (check mix.fraction)")
    return torch.tensor(sorted(chosen[:n], key=lambda i: labels[i]), dtype=torch.long)


def tsne_embedding(run_dir: Path, n: int = 2000, data_path: str | None = None, seed: int = 0,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """t-SNE (scikit-learn) of the pooled features ``(n, D)`` of a random subsample of the
    test split; returns ``(embedding (n, 2), labels (n,))``."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise OtltError("--tsne needs scikit-learn, which is not installed (pip install "
                        "scikit-learn, or install otlt with the 'report' extra)") from None

    require(n >= 5, f"--tsne-samples must be at least 5, got {n}")
    _, _, data, model = load_trained(run_dir, data_path, device)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.test), generator=generator)[:n].numpy()
    images = torch.from_numpy(data.test.images[idx]).to(device)
    features = []
    with torch.no_grad():
        for start in range(0, len(images), 500):
            features.append(model.features(eval_transform(images[start:start + 500])).float())
    z = torch.cat(features).cpu().numpy()
    perplexity = float(min(30.0, max(2.0, (len(z) - 1) / 3)))
    embedding = TSNE(n_components=2, perplexity=perplexity, init="pca",
                     random_state=seed).fit_transform(z)
    return embedding, data.test.labels[idx]
