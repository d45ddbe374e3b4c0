"""Shared fixtures: the committed sample files, the raw Adult folder, and CLI helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "sample_models"
SAMPLE_MODEL = SAMPLE_DIR / "adult_mlp.safetensors"
SAMPLE_SCHEMA = SAMPLE_DIR / "adult_schema.yaml"
FINETUNE_CSV = SAMPLE_DIR / "adult_finetune.csv"
HOLDOUT_CSV = SAMPLE_DIR / "adult_holdout.csv"
ADULT_DIR = REPO.parent / "shared" / "data" / "adult"


@pytest.fixture
def sample_model() -> Path:
    return SAMPLE_MODEL


@pytest.fixture
def sample_schema() -> Path:
    return SAMPLE_SCHEMA


@pytest.fixture
def finetune_csv() -> Path:
    return FINETUNE_CSV


@pytest.fixture
def holdout_csv() -> Path:
    return HOLDOUT_CSV


@pytest.fixture
def adult_dir() -> Path:
    """The raw UCI Adult files; tests that need them skip where they are not shipped."""
    if not (ADULT_DIR / "adult.data").is_file() or not (ADULT_DIR / "adult.test").is_file():
        pytest.skip(f"raw UCI Adult files not found in {ADULT_DIR}")
    return ADULT_DIR


@pytest.fixture
def gmn_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog that sees the package's INFO/WARNING records even after the CLI set up logging."""
    logger = logging.getLogger("gmn_debias")
    old = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="gmn_debias")
    yield caplog
    logger.propagate = old


def invoke(args: Sequence[str]):  # -> click.testing.Result
    """Run the CLI in-process with typer's CliRunner (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from gmn_debias.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, exactly one 'error: ...' line on stderr, no traceback; the line holds every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    errors = lines
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
