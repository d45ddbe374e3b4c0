"""Choosing the shipped candidate on validation data.

A candidate qualifies when its validation AP stays within ``max_ap_drop`` of the input
model's and its targeted gap is smaller than the input model's; among those the smallest
gap wins (ties: higher AP, then the earlier candidate). When none qualifies the input
model is kept, unless the user forces the smallest gap regardless of AP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AP_KEY = "average_precision"


@dataclass
class Selector:
    """Online selection: fed candidates one by one, remembers the best qualifying one."""

    target_key: str
    baseline: dict[str, Any]
    max_ap_drop: float
    force: bool = False
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
        return ap_ok and (base_gap is None or gap < base_gap)

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
