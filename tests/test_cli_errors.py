"""Bad input found by trying the CLI as a new user: one `error:` line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from gmn_debias.cli import app

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "adult_mlp.safetensors"
DATA = ROOT / "sample_models" / "adult_finetune.csv"
HOLDOUT = ROOT / "sample_models" / "adult_holdout.csv"

runner = CliRunner()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["audit", str(MODEL), str(HOLDOUT), "-p", "sex", "--max-dp", "abc"], "--max-dp"),
        (["layers", str(ROOT)], "directory"),
        (["fit", str(MODEL), str(DATA), "-p", "sex", "--batch-size", "0"], "--batch-size"),
        (["bogus"], "bogus"),
    ],
)
def test_entry_point_turns_usage_errors_into_one_line(args: list[str], needle: str) -> None:
    """The console script (not CliRunner) prints click's usage errors as one line, exit 2."""
    result = subprocess.run([sys.executable, "-m", "gmn_debias", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert needle in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr", "-1"], "--lr"),
        (["--gap-penalty", "-5"], "--gap-penalty"),
        (["--max-ap-drop", "-1"], "--max-ap-drop"),
        (["--missing-groups", "bogus"], "--missing-groups"),
        (["--inference", "magic"], "--inference"),
        (["--max-selection-drop", "1.5"], "--max-selection-drop"),
    ],
)
def test_fit_rejects_meaningless_values(tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["fit", str(MODEL), str(DATA), "-p", "sex", "--out", str(out), "-q", *extra])
    assert result.exit_code == 2
    assert needle in one_error_line(result.stderr)
    assert not out.exists()


def test_fit_out_below_a_file_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = runner.invoke(app, ["fit", str(MODEL), str(DATA), "-p", "sex", "--out", str(blocker / "sub"), "-q"])
    assert result.exit_code == 2
    assert "is a file, not a folder" in one_error_line(result.stderr)


def test_fit_never_overwrites_its_config_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert runner.invoke(app, ["fit", str(MODEL), str(DATA), "-p", "sex", "--epochs", "1", "--out", str(out), "-q"]).exit_code == 0
    config = out / "config.yaml"
    before = config.read_bytes()
    result = runner.invoke(app, ["fit", str(MODEL), str(DATA), "--config", str(config), "--out", str(out), "-q"])
    assert result.exit_code == 2
    assert "refusing to overwrite" in one_error_line(result.stderr)
    assert config.read_bytes() == before


def test_config_that_is_not_text_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\x00\xff\xfe")
    result = runner.invoke(app, ["fit", str(MODEL), str(DATA), "-p", "sex", "--config", str(bad)])
    assert result.exit_code == 2
    assert "UTF-8" in result.output + result.stderr


def test_audit_writes_no_output_when_one_output_path_is_bad(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    good = tmp_path / "ok.json"
    result = runner.invoke(app, ["audit", str(MODEL), str(HOLDOUT), "-p", "sex", "-q", "--json", str(good),
                                 "--junit", str(blocker / "gates.xml")])
    assert result.exit_code == 2
    assert "is a file, not a folder" in one_error_line(result.stderr)
    assert not good.exists()


def test_fit_warns_when_the_targeted_gap_is_undefined(tmp_path: Path) -> None:
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    frame = frame[~((frame["sex"] == "Female") & (frame["income"] == ">50K"))]  # no positive women
    path = tmp_path / "nopos.csv"
    frame.to_csv(path, index=False)
    result = runner.invoke(app, ["fit", str(MODEL), str(path), "-p", "sex", "--target", "eo", "--epochs", "1",
                                 "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "equal_opportunity_difference is undefined" in result.stderr


def test_fit_refuses_a_group_too_small_to_train_and_validate(tmp_path: Path) -> None:
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    tiny = pd.concat([frame[frame["sex"] == "Female"].iloc[:40], frame[frame["sex"] == "Male"].iloc[:1]])
    path = tmp_path / "tiny.csv"
    tiny.to_csv(path, index=False)
    result = runner.invoke(app, ["fit", str(MODEL), str(path), "-p", "sex", "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    assert "'Male': 1" in one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


def test_outputs_get_the_usual_file_mode(tmp_path: Path) -> None:
    import os

    out = tmp_path / "out"
    assert runner.invoke(app, ["fit", str(MODEL), str(DATA), "-p", "sex", "--epochs", "1", "--out", str(out), "-q"]).exit_code == 0
    mask = os.umask(0)
    os.umask(mask)
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name


@pytest.mark.parametrize(
    ("text", "needle"),
    [("gates: [max_dp]\n", "must be a mapping"), ("max_dp: 0.2\ngates: {max_dp: 0.1}\n", "both under 'gates:'")],
)
def test_config_gates_block_shape_errors(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "gates.yaml"
    cfg.write_text(text)
    result = runner.invoke(app, ["audit", str(MODEL), str(HOLDOUT), "-p", "sex", "--config", str(cfg)])
    assert result.exit_code == 2
    assert needle in result.output + result.stderr
