"""Adapters to training frameworks (optional dependencies, imported on demand)."""
