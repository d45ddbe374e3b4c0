"""attach()/fold(): hooked eval outputs equal folded outputs; refusals say what to do."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gmn_debias.errors import UserError
from gmn_debias.hooks import attach, candidate_layers


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(108, 256), nn.ReLU(), nn.Linear(256, 128), nn.BatchNorm1d(128),
                         nn.ReLU(), nn.Linear(128, 1))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def _train(model: nn.Module, handle, x: torch.Tensor, groups: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        with handle.batch(groups):
            loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fold_and_compare(model: nn.Module, names: list[str], x: torch.Tensor, groups: torch.Tensor) -> None:
    keys = {k: v.shape for k, v in model.state_dict().items()}
    handle = attach(model, names, inference="running", alpha=0.3, generator=torch.Generator().manual_seed(0))
    _train(model, handle, x, groups)
    for name in names:
        scale, _ = handle.layer(name).eval_affine()
        assert (scale - 1).abs().max() > 1e-3  # a real, non-identity map gets folded
    model.eval()
    with torch.no_grad():
        hooked = model(x)
        handle.fold()
        folded = model(x)
    assert (hooked - folded).abs().max() <= 1e-5
    if hooked.shape[1] == 1:
        assert torch.equal(hooked > 0, folded > 0)
    else:
        assert torch.equal(hooked.argmax(1), folded.argmax(1))
    assert {k: v.shape for k, v in model.state_dict().items()} == keys


def test_fold_equivalence_mlp() -> None:
    model = _mlp()
    x = torch.randn(512, 108)
    groups = (torch.rand(512) < 0.3).long()
    x[groups == 1] = 2.0 * x[groups == 1] + 1.5
    _fold_and_compare(model, ["0", "3"], x, groups)


def test_fold_equivalence_cnn() -> None:
    torch.manual_seed(1)
    model = _CNN()
    x = torch.randn(32, 3, 12, 12)
    groups = torch.randint(0, 3, (32,))
    x[groups == 2] *= 1.5
    _fold_and_compare(model, ["conv1", "bn1", "conv2"], x, groups)


def test_identity_eval_hook_changes_nothing_and_remove_detaches() -> None:
    model = _mlp()
    x = torch.randn(64, 108)
    handle = attach(model, ["2"], generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in handle.layers.named_children()] == ["2"]
    model.train()
    with handle.batch(torch.arange(64) % 2):
        trained = model(x)
    assert trained.shape == (64, 1)
    model.eval()
    hooked = model(x)
    handle.remove()
    assert torch.equal(model(x), hooked)  # identity inference
    model.train()
    model(x)  # no hook left: no groups needed
    with pytest.raises(UserError, match="removed or folded"):
        with handle.batch(torch.zeros(64, dtype=torch.long)):
            pass


def test_hook_must_fire_exactly_once() -> None:
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = shared
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    model = Twice()
    groups = torch.arange(8) % 2
    handle = attach(model, ["fc"])
    with pytest.raises(UserError, match="'fc' ran 2 times"):
        with handle.batch(groups):
            model(torch.randn(8, 4))
    handle.remove()
    handle = attach(model, ["unused"])
    with pytest.raises(UserError, match="'unused' ran 0 times"):
        with handle.batch(groups):
            model(torch.randn(8, 4))


def test_training_outside_batch_context_is_an_error() -> None:
    model = _mlp().train()
    attach(model, ["0"])
    with pytest.raises(UserError, match="handle.batch"):
        model(torch.randn(8, 108))


def test_eo_labels_reach_the_layer() -> None:
    model = _mlp().train()
    handle = attach(model, ["0"], target="eo")
    x, groups, labels = torch.randn(32, 108), torch.arange(32) % 2, (torch.arange(32) // 2) % 2
    with handle.batch(groups, labels=labels):
        model(x)
    with pytest.raises(ValueError, match="labels"):
        with handle.batch(groups):
            model(x)


def test_linear_on_sequence_features_uses_last_dim() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(16, 7, 6)
    groups = torch.arange(16) % 2
    handle = attach(model, ["0"], inference="running", generator=torch.Generator().manual_seed(0))
    _train(model, handle, x, groups, steps=2)
    model.eval()
    with torch.no_grad():
        hooked = model(x)
        handle.fold()
        assert (model(x) - hooked).abs().max() <= 1e-5


@pytest.mark.parametrize("names, match", [
    (["1"], r"cannot attach GroupMixNorm to '1': ReLU .*foldable neighbours: 0 \(Linear\), 2 \(Linear\)"),
    (["fc9"], r"no layer named 'fc9'"),
    (["3x"], r"no layer named '3x' in the model; closest: 3"),
    (["0", "0"], "repeat"),
    ([], "non-empty"),
])
def test_refusals_name_the_layer_and_alternatives(names: list[str], match: str) -> None:
    with pytest.raises(UserError, match=match):
        attach(_mlp(), names)


def test_unknown_setting_is_a_user_error() -> None:
    with pytest.raises(UserError, match="bad GroupMixNorm setting.*beta"):
        attach(_mlp(), ["0"], beta=1.0)


def test_refuses_batchnorm_without_affine_and_bias_free_running() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4, affine=False))
    with pytest.raises(UserError, match="affine=False"):
        attach(model, ["1"])
    with pytest.raises(UserError, match="no bias"):
        attach(model, ["0"], inference="running")
    handle = attach(model, ["0"])  # identity inference folds into a bias-free layer
    weight = model[0].weight.clone()
    handle.fold()
    assert torch.equal(model[0].weight, weight)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_refuses_torchscript_and_compiled_models() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    scripted = torch.jit.script(model)
    with pytest.raises(UserError, match="TorchScript.*eager"):
        attach(scripted, ["0"])
    with pytest.raises(UserError, match="TorchScript"):
        candidate_layers(scripted)
    with pytest.raises(UserError, match="_orig_mod"):
        attach(torch.compile(model), ["0"])


def test_tuple_output_is_refused_at_run_time() -> None:
    class Pair(nn.Linear):
        def forward(self, x: torch.Tensor):  # type: ignore[override]
            return super().forward(x), x

    model = nn.Sequential(nn.Linear(3, 3))
    handle = attach(model, ["0"])
    model[0].__class__ = Pair
    with pytest.raises(UserError, match="returned tuple, not a tensor"):
        with handle.batch(torch.arange(4) % 2):
            model(torch.randn(4, 3))


def test_handle_parameters_and_settings() -> None:
    handle = attach(_mlp(), ["0", "3"], alpha=0.2, p=0.5)
    assert list(handle.parameters()) == []  # GroupMixNorm has buffers, no parameters
    settings = handle.settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["layers"] == ["0", "3"] and settings["alpha"] == 0.2 and settings["p"] == 0.5
    assert handle.layer("3").num_features == 128


def test_candidate_layers_lists_shapes_and_foldability() -> None:
    torch.manual_seed(3)
    model = _CNN()
    rows = {r.name: r for r in candidate_layers(model, torch.randn(2, 3, 8, 8))}
    assert list(rows) == ["conv1", "bn1", "conv2", "head"]
    assert rows["conv1"].out_shape == (2, 16, 8, 8) and rows["conv1"].foldable
    assert rows["head"].out_shape == (2, 10) and rows["head"].type == "Linear"
    assert model.training  # the probe run restores the mode
    mlp_rows = {r.name: r for r in candidate_layers(_mlp())}
    assert not mlp_rows["1"].foldable and "ReLU" in mlp_rows["1"].note and mlp_rows["1"].out_shape is None
    bias_free = candidate_layers(nn.Sequential(nn.Linear(2, 2, bias=False)))[0]
    assert bias_free.foldable and "identity" in bias_free.note
