"""``gmn-debias layers``, and bad checkpoints through the CLI: exit 2 and one clear line."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, invoke
from safetensors.torch import save_file

from gmn_debias.archs import MLP
from gmn_debias.checkpoint import save_model

KWARGS = '{"in_dim": 5, "hidden": [8, 4]}'


def small_mlp(**kwargs) -> MLP:
    torch.manual_seed(0)
    return MLP(5, hidden=(8, 4), **kwargs)


def test_layers_of_the_sample_model(sample_model: Path) -> None:
    result = invoke(["layers", sample_model])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "GroupMixNorm", "note"]
    table = {line.split()[0]: line.split() for line in lines[1:] if line.strip() and not line.startswith("GroupMixNorm")}
    assert table["fc1"][:4] == ["fc1", "Linear", "(N,", "64)"]
    assert table["fc1"][4] == "yes" and table["fc2"][4] == "yes"
    assert table["act1"][1] == "ReLU" and table["act1"][4] == "no"
    assert table["head"][1:4] == ["Linear", "(N,", "1)"]
    assert "GroupMixNorm can follow: fc1, fc2" in result.stdout


def test_layers_json_with_arch_for_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save(small_mlp(batchnorm=True).state_dict(), path)
    result = invoke(["layers", path, "--arch", "mlp", "--arch-kwargs", '{"in_dim": 5, "hidden": [8, 4], "batchnorm": true}', "--json"])
    assert result.exit_code == 0, result.output
    infos = {item["name"]: item for item in json.loads(result.stdout)}
    assert infos["bn1"]["type"] == "BatchNorm1d" and infos["bn1"]["foldable"] is True
    assert infos["bn1"]["out_shape"][1:] == [8] and infos["fc2"]["out_shape"][1:] == [4]


def test_layers_reads_options_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    save_file(small_mlp().state_dict(), str(path))
    config = tmp_path / "cfg.yaml"
    config.write_text("arch: mlp\narch_kwargs: {in_dim: 5, hidden: [8, 4]}\n")
    result = invoke(["layers", path, "--config", config])
    assert result.exit_code == 0, result.output
    assert "GroupMixNorm can follow: fc1, fc2" in result.stdout


class SideEffect:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_crafted_pickle_via_cli(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": small_mlp().state_dict(), "x": SideEffect(marker)}, path)
    result = invoke(["layers", path, "--arch", "mlp", "--arch-kwargs", KWARGS])
    assert_one_line_error(result, "os.makedirs", "--trust-checkpoint", "state_dict")
    assert not marker.exists()


def test_trusted_pickle_warns_and_works(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": small_mlp().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    assert_one_line_error(invoke(["layers", path, "--arch", "mlp", "--arch-kwargs", KWARGS]), "argparse.Namespace")
    result = invoke(["layers", path, "--arch", "mlp", "--arch-kwargs", KWARGS, "--trust-checkpoint"])
    assert result.exit_code == 0, result.output
    assert "warning: unpickling" in result.stderr and "fc1" in result.stdout


def _scripted(tmp_path: Path) -> Path:
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(small_mlp()), str(path))
    return path


def _bad_keys(tmp_path: Path) -> Path:
    path = tmp_path / "bad.pt"
    state = small_mlp().state_dict()
    state["fc1.weight"] = torch.zeros(8, 6)
    torch.save(state, path)
    return path


def _state(tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(small_mlp().state_dict(), path)
    return path


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return path


@pytest.mark.parametrize(
    ("make", "extra", "fragments"),
    [
        (_scripted, [], ["TorchScript", "--arch"]),
        (_bad_keys, ["--arch", "mlp", "--arch-kwargs", KWARGS], ["shape mismatch: fc1.weight (8, 6) in the file vs (8, 5)"]),
        (_state, [], ["holds only weights", "--arch"]),
        (_state, ["--arch", "mlp", "--arch-kwargs", "{in_dim: 5}"], ["--arch-kwargs is not valid JSON"]),
        (_state, ["--arch", "mpl"], ["unknown architecture 'mpl'", "did you mean 'mlp'"]),
        (_state, ["--arch", "no_such_pkg_zz.mod:make"], ["cannot import module 'no_such_pkg_zz.mod'"]),
        (_state, ["--arch-kwargs", KWARGS], ["--arch-kwargs needs --arch"]),
        (_garbage, [], ["not a readable safetensors file"]),
        (lambda p: p / "absent.pt", [], ["does not exist"]),
    ],
)
def test_bad_checkpoints_give_exit_2_and_one_line(tmp_path: Path, make, extra: list[str], fragments: list[str]) -> None:
    assert_one_line_error(invoke(["layers", make(tmp_path), *extra]), *fragments)


def test_schema_option_sets_the_probe_width(tmp_path: Path, sample_model: Path, sample_schema: Path) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("features:\n- {name: a, type: numeric, mean: 0, std: 1}\n")
    path = tmp_path / "sample.safetensors"
    from gmn_debias.checkpoint import load_model

    loaded = load_model(sample_model)
    save_model(loaded.model, path, arch=loaded.arch, schema=None, provenance={})
    ok = invoke(["layers", path, "--schema", sample_schema])
    assert ok.exit_code == 0 and "(N, 64)" in ok.stdout
    assert_one_line_error(invoke(["layers", path, "--schema", wrong]), "schema encodes 1 inputs but the model takes 96")


class Reordered(torch.nn.Module):
    """Registers its last layer first, so the input-width guess (first Linear) is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(3, 1)
        self.inp = torch.nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x))


def test_failed_probe_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "reordered.pt"
    torch.save(Reordered().state_dict(), path)
    result = invoke(["layers", path, "--arch", f"{__name__}:Reordered"])
    assert_one_line_error(result, "a probe batch of 3 zero features failed", "--schema")
