"""Choosing the shipped candidate on validation data.

A candidate qualifies when its validation AP stays within ``max_ap_drop`` of the input
model's, its targeted gap is smaller than the input model's and (optionally) its overall
selection rate has not fallen by more than ``max_selection_drop`` (relative); among those the smallest
gap wins (ties: higher AP, then the earlier candidate). When none qualifies the input
model is kept, unless the user forces the smallest gap regardless of AP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .finetune import TARGET_METRIC, EpochResult, Setting, Tensors, evaluate, finetune

AP_KEY = "average_precision"


@dataclass
class Selector:
    """Online selection: fed candidates one by one, remembers the best qualifying one."""

    target_key: str
    baseline: dict[str, Any]
    max_ap_drop: float
    force: bool = False
    max_selection_drop: float | None = None
    best_key: tuple[float, float, int] | None = None
    best_forced_key: tuple[float, float, int] | None = None
    count: int = 0

    def _gap(self, metrics: dict[str, Any]) -> float | None:
        value = metrics["metrics"].get(self.target_key)
        return None if value is None else float(value)

    def qualifies(self, metrics: dict[str, Any]) -> bool:
        """AP within budget and a smaller targeted gap than the input model's."""
        gap, base_gap = self._gap(metrics), self._gap(self.baseline)
        ap, base_ap = metrics["metrics"].get(AP_KEY), self.baseline["metrics"].get(AP_KEY)
        if gap is None or ap is None or base_ap is None:
            return False
        ap_ok = ap >= base_ap - self.max_ap_drop - 1e-12
        return ap_ok and self._selects_enough(metrics) and (base_gap is None or gap < base_gap)

    def _selects_enough(self, metrics: dict[str, Any]) -> bool:
        """With ``max_selection_drop``, refuse candidates that close a gap by selecting fewer people."""
        if self.max_selection_drop is None:
            return True
        rate, base_rate = metrics["metrics"].get("selection_rate"), self.baseline["metrics"].get("selection_rate")
        if rate is None or not base_rate:
            return True
        return rate >= base_rate * (1.0 - self.max_selection_drop) - 1e-12

    def offer(self, metrics: dict[str, Any]) -> bool:
        """Record a candidate; True when it is the new best (so its weights must be kept)."""
        self.count += 1
        gap = self._gap(metrics)
        if gap is None:
            return False
        ap = metrics["metrics"].get(AP_KEY) or 0.0
        key = (gap, -ap, self.count)
        if self.qualifies(metrics):
            if self.best_key is None or key < self.best_key:
                self.best_key = key
                return True
            return False
        if self.force and self.best_key is None and (self.best_forced_key is None or key < self.best_forced_key):
            self.best_forced_key = key
            return True
        return False

    @property
    def status(self) -> str:
        """``selected`` (a qualifying candidate), ``forced`` or ``kept_original``."""
        if self.best_key is not None:
            return "selected"
        if self.best_forced_key is not None:
            return "forced"
        return "kept_original"


@dataclass
class SearchResult:
    """Every candidate's validation audit, and the chosen one (with its weights)."""

    selector: Selector
    baseline: dict[str, Any]
    best: tuple[int, EpochResult] | None
    candidates: list[dict[str, Any]] = field(default_factory=list)


def search(
    base: nn.Module,
    settings: list[Setting],
    train: Tensors,
    val: Tensors,
    *,
    target: str,
    max_ap_drop: float,
    seed: int,
    device: torch.device,
    force: bool = False,
    max_selection_drop: float | None = None,
    batch_size: int = 256,
    train_batchnorm: bool = False,
    positive_index: int | None = None,
    threshold: float = 0.5,
    on_epoch: Callable[[Setting, EpochResult], None] | None = None,
) -> SearchResult:
    """Fine-tune every setting, audit each epoch on ``val``, keep the best qualifying one.

    Only the current best candidate's weights are held in memory.
    """
    baseline = evaluate(base, val, positive_index, threshold)
    selector = Selector(TARGET_METRIC[target], baseline, max_ap_drop, force=force,
                        max_selection_drop=max_selection_drop)
    result = SearchResult(selector, baseline, None)
    for index, setting in enumerate(settings):
        def report(epoch: EpochResult, setting: Setting = setting) -> None:
            if on_epoch is not None:
                on_epoch(setting, epoch)

        epochs = finetune(
            base, setting, index, train, val, seed=seed, device=device, batch_size=batch_size,
            train_batchnorm=train_batchnorm, positive_index=positive_index, threshold=threshold,
            on_epoch=report, keep=lambda epoch: selector.offer(epoch.metrics),
        )
        for epoch in epochs:
            if epoch.state is not None:
                result.best = (index, epoch)
            result.candidates.append(epoch.summary())
    return result
