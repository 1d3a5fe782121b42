"""otlt: long-tailed image classification with optimal transport (OTmix, OT re-weighting).

The public API; see README.md for a tour. Everything here is importable without a dataset.
"""

from otlt.config import RunConfig, load_config
from otlt.data.longtail import build_splits, long_tailed_counts
from otlt.data.samplers import ClassWeightedSampler, class_sampling_probs, sample_weights
from otlt.engine.batchnorm import recalibrate_batchnorm
from otlt.engine.evaluation import model_confusion
from otlt.errors import OtltError
from otlt.losses import batch_loss, create_loss, list_losses
from otlt.metrics import confusion_matrix, summarize
from otlt.mixing import (
    CMO,
    CutMix,
    MixedBatch,
    Mixer,
    MixPlan,
    MixRecipe,
    Mixup,
    OTMix,
    Remix,
    SaliencyMix,
    create_mixer,
    list_mixers,
    otmix_cost,
    register_mixer,
)
from otlt.models import NormedLinear, create_model, list_models
from otlt.reweight import OTReweighter
from otlt.transport import OTResult, assignment, entropic_ot_value, sinkhorn

__version__ = "0.1.0"

__all__ = [
    "CMO",
    "ClassWeightedSampler",
    "CutMix",
    "MixPlan",
    "MixRecipe",
    "MixedBatch",
    "Mixer",
    "Mixup",
    "NormedLinear",
    "OTMix",
    "OTResult",
    "OTReweighter",
    "OtltError",
    "Remix",
    "RunConfig",
    "SaliencyMix",
    "assignment",
    "batch_loss",
    "build_splits",
    "class_sampling_probs",
    "confusion_matrix",
    "create_loss",
    "create_mixer",
    "create_model",
    "entropic_ot_value",
    "list_losses",
    "list_mixers",
    "list_models",
    "load_config",
    "long_tailed_counts",
    "model_confusion",
    "otmix_cost",
    "recalibrate_batchnorm",
    "register_mixer",
    "sample_weights",
    "sinkhorn",
    "summarize",
]
