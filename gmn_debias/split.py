"""Seeded train/validation split, stratified by group x label.

Stratifying keeps every (group, label) cell in both parts, so the validation gap that
chooses the epoch is measured on the same mix of people as the data it was trained on.
"""

from __future__ import annotations

import numpy as np


def stratified_split(
    strata: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train_idx, val_idx) with ``val_fraction`` of every stratum in val.

    ``strata`` is any per-row key (e.g. ``group + "|" + label``). A stratum with a single
    row stays in training. The result depends only on ``strata``, the fraction and the seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    keys, inverse = np.unique(strata, return_inverse=True)
    val_parts = []
    for k in range(len(keys)):
        rows = np.flatnonzero(inverse == k)
        n_val = int(round(len(rows) * val_fraction)) if len(rows) > 1 else 0
        n_val = min(n_val, len(rows) - 1)
        val_parts.append(rng.permutation(rows)[:n_val])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, dtype=np.int64)
    train_mask = np.ones(len(strata), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx
