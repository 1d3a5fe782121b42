"""Datasets: readers for the real formats, long-tailed construction, samplers, augmentation."""

from otlt.data.longtail import build_splits, long_tailed_counts
from otlt.data.samplers import ClassWeightedSampler, class_sampling_probs, sample_weights

__all__ = ["ClassWeightedSampler", "build_splits", "class_sampling_probs", "long_tailed_counts",
           "sample_weights"]
