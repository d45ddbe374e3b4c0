"""Pieces of the fine-tuning loop: the gap penalty, the deployed path, binary heads."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from gmn_debias.errors import UserError
from gmn_debias.finetune import (
    Setting,
    attach_setting,
    binary_logit,
    soft_gap_penalty,
)


def logit(p: list[float]) -> torch.Tensor:
    t = torch.tensor(p, dtype=torch.float64)
    return torch.log(t / (1 - t))


def test_gap_penalty_matches_hand_computation() -> None:
    # group 0: scores 0.2, 0.4 (mean 0.3, s² 0.02); group 1: 0.6, 0.8, 0.7 (mean 0.7, s² 0.01)
    value = soft_gap_penalty(logit([0.2, 0.4, 0.6, 0.8, 0.7]), torch.tensor([0, 0, 1, 1, 1]))
    expected = (0.7 - 0.3) ** 2 - 0.02 / 2 - 0.01 / 3
    assert float(value) == pytest.approx(expected, abs=1e-6)


def test_gap_penalty_per_label_averages_the_labels() -> None:
    scores = [0.2, 0.4, 0.6, 0.8, 0.1, 0.3, 0.5, 0.9]
    groups = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # label 0: means 0.3 / 0.7, s² 0.02 / 0.02; label 1: means 0.2 / 0.7, s² 0.02 / 0.08
    expected = ((0.16 - 0.01 - 0.01) + (0.25 - 0.01 - 0.04)) / 2
    assert float(soft_gap_penalty(logit(scores), groups, labels)) == pytest.approx(expected, abs=1e-6)


def test_gap_penalty_is_zero_without_two_usable_groups() -> None:
    assert float(soft_gap_penalty(logit([0.2, 0.9]), torch.tensor([0, 0]))) == 0.0
    assert float(soft_gap_penalty(logit([0.2, 0.9, 0.5]), torch.tensor([0, 0, 1]))) == 0.0  # group 1 has 1 row


def test_gap_penalty_is_unbiased_when_groups_do_not_differ() -> None:
    """Random groups: the estimate averages to 0 (a plain squared gap would be > 0)."""
    gen = torch.Generator().manual_seed(0)
    values = torch.stack([
        soft_gap_penalty(torch.randn(256, generator=gen), torch.randint(0, 2, (256,), generator=gen))
        for _ in range(2000)
    ])
    se = values.std() / len(values) ** 0.5
    assert abs(float(values.mean())) < 4 * float(se)


def test_gap_penalty_has_gradient() -> None:
    x = logit([0.2, 0.4, 0.6, 0.8]).requires_grad_()
    soft_gap_penalty(x, torch.tensor([0, 0, 1, 1])).backward()
    assert x.grad is not None and bool((x.grad[:2] < 0).all()) and bool((x.grad[2:] > 0).all())


def test_deployed_runs_the_eval_map_while_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 3), act=nn.ReLU(), head=nn.Linear(3, 1)))
    handle = attach_setting(model, Setting(("fc",), inference="running"))
    assert handle is not None
    model.train()
    handle.layers.train()
    x, groups = torch.randn(64, 4), torch.arange(64) % 2
    x[groups == 1] += 2.0
    with handle.batch(groups):
        model(x)  # tracks running statistics
    with handle.deployed():
        shipped = model(x)
    assert model.fc.training  # restored
    model.eval()
    assert torch.allclose(shipped, model(x), atol=1e-6)


def test_binary_logit_heads() -> None:
    out = torch.tensor([[0.5], [-1.0]])
    assert torch.equal(binary_logit(out, None), torch.tensor([0.5, -1.0]))
    two = torch.tensor([[1.0, 3.0]])
    assert torch.allclose(binary_logit(two, None), torch.tensor([2.0]))
    assert torch.allclose(binary_logit(two, 0), torch.tensor([-2.0]))
    with pytest.raises(UserError, match="binary"):
        binary_logit(torch.zeros(1, 3), None)


def test_evaluate_at_rate_matches_the_input_selection_rate() -> None:
    """Scores 0.1..0.8; rate 0.25 → threshold at the 75th percentile: top 2 rows selected."""
    from gmn_debias.finetune import Tensors, evaluate_at_rate

    p = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    x = torch.log(p / (1 - p)).unsqueeze(1)
    groups = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    data = Tensors(x, torch.tensor([0, 0, 0, 1, 0, 1, 1, 1]), torch.tensor([0] * 4 + [1] * 4), groups)
    audit = evaluate_at_rate(model, data, 0.25, None)
    assert audit["metrics"]["selection_rate"] == pytest.approx(0.25)
    # both selected rows (0.7, 0.8) are in group b: rates 0 and 0.5
    assert audit["metrics"]["demographic_parity_difference"] == pytest.approx(0.5)
