"""Model outputs → positive-class probabilities, and the audit progress bar's on/off rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gmn_debias import audit
from gmn_debias.errors import UserError
from gmn_debias.predict import positive_scores, predict_scores


def test_single_logit_uses_sigmoid_and_two_columns_softmax() -> None:
    logits = torch.tensor([[0.0], [2.0]])
    assert torch.allclose(positive_scores(logits), torch.sigmoid(torch.tensor([0.0, 2.0])))
    assert torch.allclose(positive_scores(logits.reshape(-1)), torch.sigmoid(torch.tensor([0.0, 2.0])))
    two = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    expected = torch.exp(two[:, 1]) / torch.exp(two).sum(1)
    assert torch.allclose(positive_scores(two), expected)  # column 1 by default
    assert torch.allclose(positive_scores(two, positive_index=0), 1 - expected)


def test_more_than_two_outputs_need_the_positive_column() -> None:
    three = torch.randn(4, 3)
    with pytest.raises(UserError, match="--positive-index"):
        positive_scores(three)
    with pytest.raises(UserError, match="out of range"):
        positive_scores(three, positive_index=3)
    assert torch.allclose(positive_scores(three, positive_index=2), torch.softmax(three, 1)[:, 2])


def test_predict_scores_batches_in_eval_mode_and_restores_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    model.train()
    x = torch.randn(10, 3)
    scores = predict_scores(model, x, batch_size=3)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(x).reshape(-1)).double().numpy()
    assert scores.dtype.name == "float64" and scores.shape == (10,)
    assert abs(scores - expected).max() < 1e-6  # float32 forward, batch split


def test_progress_bar_only_on_a_terminal_for_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.csv"
    path.write_text("y\n1\n")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert audit._bar(path, True) is None  # CI log: no bar
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert audit._bar(path, True) is None  # small file
    assert audit._bar(path, False) is None  # --quiet
    monkeypatch.setattr(audit, "PROGRESS_MIN_BYTES", 0)
    bar = audit._bar(path, True)
    assert bar is not None
    bar.close()
