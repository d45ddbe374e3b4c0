"""``gmn-debias fit`` end to end on the committed sample model, and its failure modes."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from gmn_debias.cli import app
from gmn_debias.finetune import (
    Setting,
    Tensors,
    _batches,
    autocast_context,
    finetune,
    set_train_mode,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "adult_mlp.safetensors"
DATA = ROOT / "sample_models" / "adult_finetune.csv"
HOLDOUT = ROOT / "sample_models" / "adult_holdout.csv"
FAST = ["--epochs", "2", "--quiet"]

runner = CliRunner()


def run_fit(out: Path, *extra: str, data: Path = DATA):
    return runner.invoke(app, ["fit", str(MODEL), str(data), "--protected", "sex", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def small_holdout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 holdout rows keep the end-to-end test quick."""
    path = tmp_path_factory.mktemp("data") / "holdout_small.csv"
    pd.read_csv(HOLDOUT, dtype=str, keep_default_na=False).iloc[:3000].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, small_holdout: Path) -> Path:
    out = tmp_path_factory.mktemp("fit") / "out"
    result = run_fit(out, "--eval", str(small_holdout))
    assert result.exit_code == 0, result.output
    return out


def plain_mlp() -> nn.Module:
    """The sample architecture written out here, with no gmn_debias code."""
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(96, 64), act1=nn.ReLU(), fc2=nn.Linear(64, 32), act2=nn.ReLU(), head=nn.Linear(32, 1)
    ))


def test_fit_writes_checkpoint_report_and_config(fitted: Path) -> None:
    names = sorted(p.name for p in fitted.iterdir())
    assert names == ["adult_mlp.debiased.safetensors", "config.yaml", "report.json", "report.md"]
    report = json.loads((fitted / "report.json").read_text())
    assert report["checkpoint"].endswith("adult_mlp.debiased.safetensors")
    for side in ("before", "after"):
        assert set(report[side]["groups"]) == {"Female", "Male"}
        assert "demographic_parity_difference" in report[side]["metrics"]
    assert report["evaluated_on"]["source"] == "eval"
    assert report["evaluated_on"]["rows"] == 3000
    md = (fitted / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Verdict:** DP gap ")
    assert "selection rate" in md.splitlines()[2]
    matched = report["at_input_selection_rate"]
    assert matched["selection_rate"] == report["before"]["metrics"]["selection_rate"]
    config = yaml.safe_load((fitted / "config.yaml").read_text())
    assert config["protected"] == ["sex"] and config["epochs"] == 2
    # Every candidate of the search is in the report, and at most one is marked picked:
    # the dp defaults are 2 settings (gap penalty 0 and 4) x 2 epochs + 1 stats-only epoch.
    cands = report["validation"]["candidates"]
    assert len(report["settings"]) == 3 and len(cands) == 5
    assert sum(c["picked"] for c in cands) == (0 if report["selection"]["status"] == "kept_original" else 1)


def test_debiased_checkpoint_loads_without_gmn_debias_and_audit_reproduces_after(fitted: Path, small_holdout: Path) -> None:
    ckpt = fitted / "adult_mlp.debiased.safetensors"
    model = plain_mlp()
    model.load_state_dict(load_file(str(ckpt)), strict=True)
    report = json.loads((fitted / "report.json").read_text())
    audit_json = fitted.parent / "audit.json"
    result = runner.invoke(app, ["audit", str(ckpt), str(small_holdout), "--protected", "sex",
                                 "--json", str(audit_json), "--quiet"])
    assert result.exit_code == 0, result.output
    audit = json.loads(audit_json.read_text())
    assert audit["metrics"] == report["after"]["metrics"]
    assert audit["groups"] == report["after"]["groups"]


def test_fit_is_byte_identical_for_the_same_seed(tmp_path: Path, small_holdout: Path) -> None:
    digests = []
    for name in ("a", "b"):
        assert run_fit(tmp_path / name, "--eval", str(small_holdout)).exit_code == 0
        digests.append((tmp_path / name / "adult_mlp.debiased.safetensors").read_bytes())
    assert digests[0] == digests[1]
    assert run_fit(tmp_path / "c", "--seed", "1", "--eval", str(small_holdout)).exit_code == 0
    assert (tmp_path / "c" / "adult_mlp.debiased.safetensors").read_bytes() != digests[0]


def test_config_file_sets_options_and_flags_win(tmp_path: Path) -> None:
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump({"protected": ["sex"], "epochs": 1, "alpha": ["0.3"], "target": "eo", "seed": 5}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["fit", str(MODEL), str(DATA), "--config", str(cfg), "--out", str(out),
                                 "--seed", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["alpha"] == [0.3] and saved["target"] == "eo"
    assert saved["seed"] == 3  # the flag overrides the file
    report = json.loads((out / "report.json").read_text())
    assert report["evaluated_on"]["source"] == "validation"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--protected", "gender"], "gender"),
        (["--protected", "sex", "--device", "cuda"] if not torch.cuda.is_available() else ["--protected", "sex", "--device", "tpu"], "device"),
        (["--protected", "sex", "--target", "parity"], "--target"),
        (["--protected", "sex", "--alpha", "abc"], "--alpha"),
        ([], "--protected"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["fit", str(MODEL), str(DATA), "--out", str(out), "--quiet", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_single_group_is_refused(tmp_path: Path) -> None:
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    only_men = tmp_path / "men.csv"
    frame[frame["sex"] == "Male"].to_csv(only_men, index=False)
    result = run_fit(tmp_path / "out", data=only_men)
    assert result.exit_code == 2
    assert "single group" in result.stderr and not (tmp_path / "out").exists()


def test_output_never_overwrites_an_input(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    data = out / "report.json"  # an input that sits where an output would go
    data.write_bytes(DATA.read_bytes())
    result = run_fit(out, data=data)
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr
    assert data.read_bytes() == DATA.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_interrupted_run_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gmn_debias.select as select

    real = select.finetune

    def interrupted(*args, **kwargs):
        kwargs["on_epoch"] = lambda result: (_ for _ in ()).throw(KeyboardInterrupt())
        return real(*args, **kwargs)

    monkeypatch.setattr(select, "finetune", interrupted)
    out = tmp_path / "out"
    result = run_fit(out)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_only_on_cuda() -> None:
    assert not isinstance(autocast_context(torch.device("cpu")), torch.autocast)
    ctx = autocast_context(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_batches_never_hold_a_single_row() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in _batches(513, 256, gen)]
    assert sizes == [256, 256]  # the lone 513th row is dropped, never a batch of one
    assert sorted(torch.cat(list(_batches(512, 256, torch.Generator().manual_seed(0)))).tolist()) == list(range(512))


def _toy(n: int = 400, seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    groups = torch.randint(0, 2, (n,), generator=g)
    x[:, 0] += 1.5 * groups
    y = ((x[:, 0] + x[:, 1]) > 0.7).long()
    return Tensors(x, y, groups, np.where(groups.numpy() == 1, "b", "a"))


def test_frozen_batchnorm_keeps_its_statistics_and_unfrozen_updates() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(6, 8), bn=nn.BatchNorm1d(8), act=nn.ReLU(), head=nn.Linear(8, 1)))
    model.eval()
    data = _toy()
    setting = Setting(("fc",), epochs=1)
    before = model.bn.running_mean.clone()
    # finetune trains a copy; the kept snapshot shows the copy's BatchNorm buffers.
    results = finetune(model, setting, 0, data, data, seed=0, device=torch.device("cpu"), keep=lambda r: True)
    frozen = results[0].state["model"]["bn.running_mean"]
    assert torch.equal(frozen, before)
    results = finetune(model, setting, 0, data, data, seed=0, device=torch.device("cpu"), keep=lambda r: True,
                       train_batchnorm=True)
    assert not torch.equal(results[0].state["model"]["bn.running_mean"], before)
    set_train_mode(model, None, True, train_batchnorm=False)
    assert model.training and not model.bn.training


def test_small_models_train_on_one_cpu_thread_and_threads_are_restored() -> None:
    from gmn_debias.fit import cpu_threads, training_threads

    small, big = nn.Linear(4, 1), nn.Linear(2000, 1000)
    assert training_threads(None, small, torch.device("cpu")) == 1
    assert training_threads(None, big, torch.device("cpu")) == torch.get_num_threads()
    assert training_threads(3, small, torch.device("cpu")) == 3
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
