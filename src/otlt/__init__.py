"""otlt: long-tailed image classification with optimal transport."""
__version__ = "0.1.0"
