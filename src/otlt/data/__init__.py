"""Datasets: readers for the real formats, long-tailed construction, samplers, augmentation."""
