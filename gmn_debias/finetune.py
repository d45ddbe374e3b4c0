"""The fine-tuning loop: train a hooked model with GroupMixNorm, score it every epoch.

The protected groups reach the GroupMixNorm hooks only (through ``handle.batch``), never
the model's input. Every epoch ends with a validation audit of the hooked model in eval
mode, which is exactly what the folded model will compute, so the epoch chosen on
validation is the model that ships.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import UserError
from .hooks import GMNHandle, attach
from .metrics import audit_arrays
from .predict import predict_scores

TARGET_METRIC = {
    "dp": "demographic_parity_difference",
    "eo": "equal_opportunity_difference",
    "eod": "equalized_odds_difference",
}


@dataclass(frozen=True)
class Setting:
    """One fine-tuning recipe; ``fit`` may try several and keep the best on validation."""

    layers: tuple[str, ...]
    alpha: float = 0.5
    lr: float = 1e-3
    epochs: int = 5
    mix_target: str = "dp"  # "dp": mix across groups; "eo": mix within the same label
    inference: str = "identity"
    p: float = 1.0
    gap_penalty: float = 0.0

    def describe(self) -> str:
        """Short human label used in progress lines and report tables."""
        text = f"alpha={self.alpha:g} lr={self.lr:g} mix={self.mix_target} layers={','.join(self.layers)}"
        if self.inference != "identity":
            text += f" inference={self.inference}"
        if self.gap_penalty:
            text += f" gap_penalty={self.gap_penalty:g}"
        return text


@dataclass
class Tensors:
    """Model-ready rows: features, 0/1 labels, integer group ids (plus their text labels)."""

    x: torch.Tensor
    y: torch.Tensor
    group_ids: torch.Tensor
    groups: np.ndarray
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device) -> "Tensors":
        """Hold the data on the training device once, not per batch."""
        w = None if self.weights is None else self.weights.to(device)
        return Tensors(self.x.to(device), self.y.to(device), self.group_ids.to(device), self.groups, w)


@dataclass
class EpochResult:
    """Validation audit of one (setting, epoch) candidate."""

    setting: int
    epoch: int
    train_loss: float | None
    metrics: dict[str, Any]
    state: dict[str, Any] | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON-able part (no weights)."""
        data = asdict(self)
        data.pop("state")
        return data


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA only; CPU training stays float32 (and deterministic)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_train_mode(model: nn.Module, handle: GMNHandle | None, train: bool, train_batchnorm: bool) -> None:
    """Switch model and GroupMixNorm layers together; frozen BatchNorms stay in eval mode."""
    model.train(train)
    if handle is not None:
        handle.layers.train(train)
    if train and not train_batchnorm:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


def binary_logit(outputs: torch.Tensor, positive_index: int | None) -> torch.Tensor:
    """The positive class's log-odds from a 1-output or 2-output head."""
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        return outputs.reshape(-1)
    if outputs.shape[-1] == 2:
        pos = 1 if positive_index is None else positive_index
        return outputs[:, pos] - outputs[:, 1 - pos]
    raise UserError(f"fit needs a binary classifier (1 or 2 outputs); the model has {outputs.shape[-1]}")


def soft_gap_penalty(logit: torch.Tensor, group_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """GapReg term: unbiased estimate of the squared gap between groups' mean scores.

    For each pair of groups in the batch, ``(m_a − m_b)² − s²_a/n_a − s²_b/n_b`` estimates
    ``(E[score|a] − E[score|b])²`` without the sampling-noise term, so the penalty has no
    pull when the groups do not differ (a plain batch gap would also shrink every score
    toward the mean, which the random-group control exposes). Averaged over pairs, and
    with ``labels`` over labels too (the equalized-odds form). Zero without two groups of
    at least two rows.
    """
    probs = torch.sigmoid(logit.float())
    k = int(group_ids.max()) + 1
    label = torch.zeros_like(group_ids) if labels is None else labels.long()
    cell = label * k + group_ids
    size = (int(label.max()) + 1) * k
    ones = torch.ones_like(probs)
    n = probs.new_zeros(size).index_add_(0, cell, ones).view(-1, k)
    s1 = probs.new_zeros(size).index_add_(0, cell, probs).view(-1, k)
    s2 = probs.new_zeros(size).index_add_(0, cell, probs * probs).view(-1, k)
    ok = n >= 2
    safe = n.clamp_min(2)
    mean = s1 / safe
    noise = ((s2 - s1 * mean) / (safe - 1)).clamp_min(0) / safe  # s²/n per cell
    diff = (mean.unsqueeze(2) - mean.unsqueeze(1)) ** 2 - noise.unsqueeze(2) - noise.unsqueeze(1)
    pair = ok.unsqueeze(2) & ok.unsqueeze(1) & torch.ones(k, k, dtype=torch.bool, device=probs.device).triu(1)
    return diff[pair].mean() if bool(pair.any()) else probs.new_zeros(())


def evaluate(
    model: nn.Module,
    data: Tensors,
    positive_index: int | None,
    threshold: float = 0.5,
    protected: list[str] | None = None,
) -> dict[str, Any]:
    """Audit object (the ``audit --json`` layout) for ``model`` on ``data``."""
    scores = predict_scores(model, data.x, positive_index=positive_index, device=data.x.device)
    weights = None if data.weights is None else data.weights.cpu().numpy()
    return audit_arrays(
        data.y.cpu().numpy(), scores, data.groups, threshold=threshold, sample_weight=weights,
        protected=protected,
    )


def evaluate_at_rate(
    model: nn.Module,
    data: Tensors,
    rate: float,
    positive_index: int | None,
    protected: list[str] | None = None,
) -> dict[str, Any]:
    """Audit at the threshold that selects ``rate`` of the rows (the input model's rate).

    A DP gap at a fixed threshold also shrinks when the model simply selects fewer people
    overall (levelling down); at a matched selection rate only a real change in how the
    groups are ranked shows.
    """
    scores = predict_scores(model, data.x, positive_index=positive_index, device=data.x.device)
    threshold = float(np.quantile(scores, 1.0 - rate)) if len(scores) else 0.5
    weights = None if data.weights is None else data.weights.cpu().numpy()
    return audit_arrays(
        data.y.cpu().numpy(), scores, data.groups, threshold=threshold, sample_weight=weights,
        protected=protected,
    )


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one row is dropped (BatchNorm, group stats)."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if idx.numel() >= 2:
            yield idx


def snapshot(model: nn.Module, handle: GMNHandle | None) -> dict[str, Any]:
    """Copy of the weights that define a candidate (model + GroupMixNorm buffers)."""
    return {
        "model": copy.deepcopy(model.state_dict()),
        "gmn": copy.deepcopy(handle.layers.state_dict()) if handle is not None else {},
    }


def attach_setting(model: nn.Module, setting: Setting) -> GMNHandle | None:
    """Hook GroupMixNorm as ``setting`` says; no layers means plain fine-tuning (the control)."""
    if not setting.layers:
        return None
    return attach(
        model,
        list(setting.layers),
        alpha=setting.alpha,
        p=setting.p,
        inference=setting.inference,
        target=setting.mix_target,
    )


def finetune(
    base_model: nn.Module,
    setting: Setting,
    setting_index: int,
    train: Tensors,
    val: Tensors,
    *,
    seed: int,
    device: torch.device,
    batch_size: int = 256,
    train_batchnorm: bool = False,
    positive_index: int | None = None,
    threshold: float = 0.5,
    on_epoch: Callable[[EpochResult], None] | None = None,
    keep: Callable[[EpochResult], bool] | None = None,
) -> list[EpochResult]:
    """Fine-tune a copy of ``base_model`` under ``setting``; audit validation after each epoch.

    ``keep(result)`` decides whether a candidate's weights are worth a snapshot (the caller
    keeps only the best so far); the snapshot lands in ``result.state``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base_model).to(device)
    handle = attach_setting(model, setting)
    if handle is not None:
        handle.layers.to(device)
    train_d, val_d = train.to(device), val.to(device)
    extra = list(handle.layers.parameters()) if handle is not None else []
    params = [p for p in list(model.parameters()) + extra if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=setting.lr) if setting.lr > 0 else None
    results: list[EpochResult] = []
    try:
        for epoch in range(1, setting.epochs + 1):
            set_train_mode(model, handle, True, train_batchnorm)
            total, seen = 0.0, 0
            for idx in _batches(len(train_d), batch_size, generator):
                xb, yb, gb = train_d.x[idx], train_d.y[idx], train_d.group_ids[idx]
                labels = yb if setting.mix_target == "eo" else None
                with torch.set_grad_enabled(optimizer is not None), autocast_context(device):
                    with handle.batch(gb, labels=labels) if handle is not None else contextlib.nullcontext():
                        logit = binary_logit(model(xb).float(), positive_index)
                    weight = None if train_d.weights is None else train_d.weights[idx]
                    loss = nn.functional.binary_cross_entropy_with_logits(logit, yb.float(), weight=weight)
                    if setting.gap_penalty:
                        # The penalty is on the model that ships (GroupMixNorm's eval map), not on
                        # the mixed training path, whose group gap the mixing already hides.
                        shipped = logit
                        if handle is not None:
                            with handle.deployed():
                                shipped = binary_logit(model(xb).float(), positive_index)
                        loss = loss + setting.gap_penalty * soft_gap_penalty(shipped, gb, labels)
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                total += float(loss.detach()) * idx.numel()
                seen += idx.numel()
            set_train_mode(model, handle, False, train_batchnorm)
            with autocast_context(device):
                metrics = evaluate(model, val_d, positive_index, threshold)
            result = EpochResult(setting_index, epoch, total / max(seen, 1), metrics)
            if keep is not None and keep(result):
                result.state = snapshot(model, handle)
            results.append(result)
            if on_epoch is not None:
                on_epoch(result)
    finally:
        if handle is not None:
            handle.remove()
    return results
