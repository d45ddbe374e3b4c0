"""Loading and saving checkpoints: formats, wrappers, safety, provenance."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from gmn_debias import __version__
from gmn_debias.archs import MLP, build_arch
from gmn_debias.checkpoint import (
    load_model,
    load_weights,
    model_input_width,
    require_eager,
    save_model,
)
from gmn_debias.errors import UserError
from gmn_debias.files import sha256_file
from gmn_debias.schema import CategoricalFeature, FeatureSchema, NumericFeature

ARCH = {"name": "mlp", "kwargs": {"in_dim": 5, "hidden": [8, 4]}}


def make_mlp(**kwargs) -> MLP:
    torch.manual_seed(0)
    model = MLP(5, hidden=(8, 4), **kwargs)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a lost buffer would show
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


def batch(n: int = 7, width: int = 5) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


SCHEMA = FeatureSchema(
    [NumericFeature("age", 38.5, 13.2), CategoricalFeature("colour", ["blue", "green", "red", "x"])],
    label="y",
    positive="yes",
)


# --------------------------------------------------------------------- safetensors
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"batchnorm": True}, {"dropout": 0.2, "activation": "gelu"}, {"activation": "tanh", "out_dim": 2}],
)
def test_safetensors_round_trip_needs_no_other_input(tmp_path: Path, kwargs: dict) -> None:
    model = make_mlp(**kwargs)
    arch = {"name": "mlp", "kwargs": {"in_dim": 5, "hidden": [8, 4], **kwargs}}
    path = tmp_path / "m.safetensors"
    digest = save_model(model, path, arch=arch, schema=SCHEMA, provenance={"seed": 3}, check_input=batch())
    loaded = load_model(path)
    assert loaded.format == "safetensors" and not loaded.scripted
    assert loaded.arch == arch
    assert loaded.schema == SCHEMA
    assert loaded.sha256 == digest == sha256_file(path)
    assert not loaded.model.training
    assert torch.equal(outputs(loaded.model, batch()), outputs(model, batch()))


def test_metadata_is_strings_with_provenance_and_gmn_settings(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    provenance = {"source_sha256": "ab" * 32, "data_sha256": "cd" * 32, "seed": 7}
    gmn = {"layers": ["fc1"], "alpha": 0.5}
    save_model(make_mlp(), path, arch=ARCH, schema=SCHEMA, provenance=provenance, gmn=gmn)
    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata()
    assert all(isinstance(v, str) for v in raw.values())
    decoded = {k: json.loads(v) for k, v in raw.items() if k.startswith("gmn_debias.")}
    assert decoded["gmn_debias.provenance"] == {"tool": "gmn-debias", "version": __version__, **provenance}
    assert decoded["gmn_debias.gmn"] == gmn
    assert decoded["gmn_debias.arch"] == ARCH
    assert load_model(path).metadata["gmn"] == gmn


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 5)
            self.b.weight = self.a.weight  # tied weights: one storage, two names
            self.c = nn.Linear(5, 3)
            self.c.weight = nn.Parameter(torch.randn(5, 3).t())  # a transposed (non-contiguous) view

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    model = Tied()
    assert not model.c.weight.is_contiguous()
    path = tmp_path / "tied.safetensors"
    save_model(model, path, arch=None, schema=None, provenance={}, check_input=batch())
    fresh = Tied()
    load_weights(fresh, load_file(path), source=path, arch_name="Tied")
    assert fresh.b.weight.data_ptr() == fresh.a.weight.data_ptr()
    assert torch.equal(outputs(fresh, batch()), outputs(model, batch()))


def test_reload_check_catches_a_model_that_does_not_reproduce(tmp_path: Path) -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + torch.rand(1)

    path = tmp_path / "noisy.safetensors"
    with pytest.raises(RuntimeError, match="reload check failed"):
        save_model(Noisy(), path, arch=None, schema=None, provenance={}, check_input=batch())
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp file left


def test_reload_check_rebuilds_from_the_stored_architecture(tmp_path: Path) -> None:
    """A wrong architecture record would make the file unloadable: caught before it is written."""
    path = tmp_path / "m.safetensors"
    with pytest.raises(UserError, match=r"not saved: .*m\.safetensors does not match architecture mlp: unexpected keys: bn1"):
        save_model(make_mlp(batchnorm=True), path, arch=ARCH, schema=None, provenance={})
    assert not path.exists()


def test_save_never_overwrites_an_input(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(make_mlp(), path, arch=ARCH, schema=None, provenance={})
    before = path.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        save_model(make_mlp(batchnorm=True), path, arch=ARCH, schema=None, provenance={}, inputs=[path])
    assert path.read_bytes() == before


def test_pt_output_is_a_plain_state_dict(tmp_path: Path) -> None:
    model = make_mlp(batchnorm=True)
    path = tmp_path / "m.pt"
    arch = {"name": "mlp", "kwargs": {**ARCH["kwargs"], "batchnorm": True}}
    save_model(model, path, arch=arch, schema=SCHEMA, provenance={}, check_input=batch())
    state = torch.load(path, weights_only=True)
    fresh = MLP(5, hidden=(8, 4), batchnorm=True)
    fresh.load_state_dict(state)  # plain PyTorch, strict: no gmn_debias needed
    assert torch.equal(outputs(fresh, batch()), outputs(model, batch()))


# ---------------------------------------------------------- state_dicts and --arch
@pytest.fixture(params=["pt", "safetensors"])
def state_pt(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A bare state_dict as users bring it: torch.save'd, or a safetensors file without our metadata."""
    if request.param == "pt":
        path = tmp_path / "state.pt"
        torch.save(make_mlp().state_dict(), path)
    else:
        path = tmp_path / "state.safetensors"
        save_file(make_mlp().state_dict(), str(path))
    return path


@pytest.mark.parametrize("arch", ["mlp", "gmn_debias.archs:MLP"])
@pytest.mark.parametrize("kwargs", ['{"in_dim": 5, "hidden": [8, 4]}', {"in_dim": 5, "hidden": [8, 4]}])
def test_state_dict_with_arch(state_pt: Path, arch: str, kwargs) -> None:
    loaded = load_model(state_pt, arch=arch, arch_kwargs=kwargs)
    assert loaded.format == state_pt.suffix.lstrip(".") and loaded.schema is None
    assert loaded.arch == {"name": arch, "kwargs": {"in_dim": 5, "hidden": [8, 4]}}
    assert torch.equal(outputs(loaded.model, batch()), outputs(make_mlp(), batch()))


def test_state_dict_without_arch_says_how_to_name_it(state_pt: Path) -> None:
    with pytest.raises(UserError, match="--arch package.module:factory"):
        load_model(state_pt)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_wrappers_and_prefixes(tmp_path: Path, gmn_caplog, wrapper: str, prefix: str) -> None:
    state = {prefix + k: v for k, v in make_mlp().state_dict().items()}
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    loaded = load_model(path, arch="mlp", arch_kwargs=ARCH["kwargs"])
    assert torch.equal(outputs(loaded.model, batch()), outputs(make_mlp(), batch()))
    stripped = [r.getMessage() for r in gmn_caplog.records if "stripped the" in r.getMessage()]
    assert len(stripped) == prefix.count(".")  # one line per prefix removed, none when there was none


def test_prefix_kept_when_the_model_itself_uses_it(tmp_path: Path) -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    torch.manual_seed(0)
    src = Holder()
    path = tmp_path / "holder.pt"
    torch.save(src.state_dict(), path)
    target = Holder()
    load_weights(target, torch.load(path, weights_only=True), source=path, arch_name="Holder")
    assert torch.equal(target.module.weight, src.module.weight)


def test_mismatched_keys_and_shapes_are_listed(tmp_path: Path) -> None:
    state = make_mlp().state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["fc2.bias"]
    state["head.weight"] = torch.zeros(1, 7)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        load_model(path, arch="mlp", arch_kwargs=ARCH["kwargs"])
    message = str(info.value)
    assert "missing keys: fc2.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "head.weight (1, 7) in the file vs (1, 4) in the model" in message
    assert "\n" not in message


def test_file_architecture_may_not_import_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    meta = {"gmn_debias.arch": json.dumps({"name": "os:system", "kwargs": {"command": "echo hi"}})}
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(UserError, match="would import code"):
        load_model(path)


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("mpl", None, "did you mean 'mlp'"),
        ("no_such_module_xyz:f", None, "cannot import module"),
        ("gmn_debias.archs:Nope", None, "has no attribute"),
        ("mlp", '{"in_dim": 5, "widths": 3}', "rejected its keyword arguments"),
        ("mlp", "{in_dim: 5}", "not valid JSON"),
        ("mlp", "[5]", "must be a JSON object"),
    ],
)
def test_bad_arch_options(state_pt: Path, arch: str, kwargs, match: str) -> None:
    with pytest.raises(UserError, match=match):
        load_model(state_pt, arch=arch, arch_kwargs=kwargs)


# ------------------------------------------------------------------- pickles: safety
class SideEffect:
    """Unpickling this creates ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_crafted_pickle_is_not_executed_without_trust(tmp_path: Path, gmn_caplog) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": make_mlp().state_dict(), "payload": SideEffect(marker)}, path)
    with pytest.raises(UserError) as info:
        load_model(path, arch="mlp", arch_kwargs=ARCH["kwargs"])
    assert not marker.exists()
    message = str(info.value)
    assert "os.makedirs" in message and "--trust-checkpoint" in message and "state_dict" in message
    # the payload is real: with the flag it runs, with a warning
    loaded = load_model(path, arch="mlp", arch_kwargs=ARCH["kwargs"], trust_checkpoint=True)
    assert marker.exists()
    assert any(r.levelname == "WARNING" and "trust-checkpoint" in r.getMessage() for r in gmn_caplog.records)
    assert torch.equal(outputs(loaded.model, batch()), outputs(make_mlp(), batch()))


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [(argparse.Namespace(lr=0.1), "argparse.Namespace"), (np.float64(0.5), "numpy")],
)
def test_non_tensor_objects_need_trust(tmp_path: Path, extra, culprit: str) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": make_mlp().state_dict(), "extra": extra}, path)
    with pytest.raises(UserError, match=culprit):
        load_model(path, arch="mlp", arch_kwargs=ARCH["kwargs"])
    loaded = load_model(path, arch="mlp", arch_kwargs=ARCH["kwargs"], trust_checkpoint=True)
    assert torch.equal(outputs(loaded.model, batch()), outputs(make_mlp(), batch()))


def test_whole_pickled_model(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(make_mlp(), path)
    with pytest.raises(UserError, match="gmn_debias.archs.MLP"):
        load_model(path)
    loaded = load_model(path, trust_checkpoint=True)
    assert loaded.format == "pickle" and loaded.arch is None
    assert torch.equal(outputs(loaded.model, batch()), outputs(make_mlp(), batch()))


def test_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_model(garbage, arch="mlp", arch_kwargs=ARCH["kwargs"])
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------- TorchScript
def script(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(path))


def test_torchscript_loads_for_inference_but_not_injection(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    script(make_mlp(), path)
    loaded = load_model(path)
    assert loaded.format == "torchscript" and loaded.scripted and loaded.arch is None
    assert torch.equal(outputs(loaded.model, batch()), outputs(make_mlp(), batch()))
    assert model_input_width(loaded.model) == 5
    with pytest.raises(UserError, match="TorchScript") as info:
        require_eager(loaded)
    assert "--arch" in str(info.value)


def test_torchscript_weights_into_an_eager_class(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    script(make_mlp(), path)
    loaded = load_model(path, arch="mlp", arch_kwargs=ARCH["kwargs"])
    assert not loaded.scripted and require_eager(loaded) is loaded.model
    assert torch.equal(outputs(loaded.model, batch()), outputs(make_mlp(), batch()))


# -------------------------------------------------------------------- input width
def test_model_input_width() -> None:
    assert model_input_width(MLP(11)) == 11
    assert model_input_width(build_arch("mlp", {"in_dim": 3, "batchnorm": True})) == 3
    assert model_input_width(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 2))) == 6
    assert model_input_width(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))) is None
    assert model_input_width(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1))) is None


def test_sample_model_loads_with_its_schema(sample_model: Path, sample_schema: Path) -> None:
    loaded = load_model(sample_model)
    assert loaded.arch["name"] == "mlp"
    assert loaded.schema == FeatureSchema.from_yaml(sample_schema)
    assert loaded.schema.width == model_input_width(loaded.model)
    assert (loaded.schema.label, loaded.schema.positive) == ("income", ">50K")
    assert not {"sex", "race", "fnlwgt"} & set(loaded.schema.columns)


def test_same_model_same_bytes(tmp_path: Path) -> None:
    """safetensors writes metadata in hash-map order; ours is sorted, so saves are reproducible."""
    provenance = {f"key{i}": i for i in range(6)}
    digests = {
        save_model(make_mlp(), tmp_path / f"m{i}.safetensors", arch=ARCH, schema=SCHEMA, provenance=provenance, gmn={"a": 1})
        for i in range(4)
    }
    assert len(digests) == 1
