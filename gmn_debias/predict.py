"""Model outputs → positive-class probabilities, the one score every audit works on.

A single logit ((N,) or (N, 1)) goes through a sigmoid; two or more columns through a
softmax, from which the positive class's column is taken. With more than two columns the
positive class must be named: guessing "the last column" silently audits the wrong class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import UserError


def positive_scores(outputs: torch.Tensor, positive_index: int | None = None) -> torch.Tensor:
    """Probability of the positive class, shape (N,), from raw model outputs (logits)."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        if positive_index not in (None, 0):
            raise UserError(f"the model has one output, so --positive-index must be 0 or unset, not {positive_index}")
        return torch.sigmoid(outputs.reshape(-1))
    if outputs.dim() != 2:
        raise UserError(f"expected model outputs of shape (N,), (N, 1) or (N, C), got {tuple(outputs.shape)}")
    n_classes = outputs.shape[1]
    if positive_index is None:
        if n_classes > 2:
            raise UserError(f"the model has {n_classes} outputs: name the positive class column with --positive-index")
        positive_index = 1
    if not 0 <= positive_index < n_classes:
        raise UserError(f"--positive-index {positive_index} is out of range for {n_classes} outputs")
    return torch.softmax(outputs, dim=1)[:, positive_index]


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    x: torch.Tensor,
    *,
    positive_index: int | None = None,
    batch_size: int = 8192,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Positive-class probabilities (float64) of ``model`` in eval mode, batch by batch.

    Outputs are cast to float32 before the sigmoid/softmax so half-precision models and
    ``fit``'s own evaluation give the same figures; the caller's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start : start + batch_size].to(device)).float()
            parts.append(positive_scores(out, positive_index).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.empty(0)
