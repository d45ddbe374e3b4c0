"""Unseen category values: a warning with the count by default, exit 2 with --strict."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from gmn_debias.cli import app

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "adult_mlp.safetensors"
HOLDOUT = ROOT / "sample_models" / "adult_holdout.csv"

runner = CliRunner()


@pytest.fixture(scope="module")
def unseen_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = pd.read_csv(HOLDOUT, dtype=str, keep_default_na=False).iloc[:600].copy()
    frame.loc[frame.index[:3], "workclass"] = "Space-Force"
    path = tmp_path_factory.mktemp("unseen") / "unseen.csv"
    frame.to_csv(path, index=False)
    return path


def test_audit_warns_on_unseen_categories(unseen_csv: Path) -> None:
    result = runner.invoke(app, ["audit", str(MODEL), str(unseen_csv), "--protected", "sex"])
    assert result.exit_code == 0, result.output
    assert "workclass" in result.stderr and "3" in result.stderr


@pytest.mark.parametrize("command", ["audit", "fit"])
def test_strict_makes_unseen_categories_an_error(unseen_csv: Path, tmp_path: Path, command: str) -> None:
    extra = ["--out", str(tmp_path / "out"), "--epochs", "1"] if command == "fit" else []
    result = runner.invoke(app, [command, str(MODEL), str(unseen_csv), "--protected", "sex", "--strict", "--quiet", *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "workclass" in lines[0]
    assert "Space-Force" in lines[0]
    assert not (tmp_path / "out").exists()
