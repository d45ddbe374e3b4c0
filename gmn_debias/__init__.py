"""gmn-debias: debias a trained PyTorch classifier with GroupMixNorm, and audit it."""

__version__ = "0.1.0"
