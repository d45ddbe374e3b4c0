"""Attach GroupMixNorm to named layers of an existing model, and fold it back out.

A forward hook replaces a layer's output by ``GroupMixNorm(output)``, so any trained
``nn.Module`` can be fine-tuned with group mixing without editing its code. In eval mode
the layer is a per-feature affine map; :meth:`GMNHandle.fold` merges it into the hooked
module's own weight and bias, so the debiased model keeps its architecture and
state_dict keys and needs no gmn_debias at inference.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .layer import GroupMixNorm

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
FOLDABLE = (nn.Linear, *_CONV, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`candidate_layers`."""

    name: str
    type: str
    out_shape: tuple[int, ...] | None
    foldable: bool
    note: str


def _fold_problem(module: nn.Module) -> str | None:
    """Why the eval-mode affine map cannot be merged into ``module`` (None: it can)."""
    if type(module) not in FOLDABLE:
        return f"{type(module).__name__} has no per-feature weight and bias to absorb the map"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not module.affine:
        return "BatchNorm without affine weight and bias (affine=False)"
    return None


def _features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONV):
        return module.out_channels
    return module.num_features  # BatchNorm


def _refuse_uninjectable(model: nn.Module) -> None:
    """TorchScript and torch.compile'd models run without Python hooks: refuse them."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError("the model is TorchScript: forward hooks do not run inside it; provide the eager "
                        "model instead (its weights as .safetensors/.pt plus the architecture, --arch)")
    if hasattr(model, "_orig_mod"):
        raise UserError("the model was compiled with torch.compile: hooks cannot be attached to the compiled "
                        "wrapper; pass the eager module (model._orig_mod) instead")


def _neighbours(model: nn.Module, name: str, count: int = 2) -> str:
    """Foldable modules nearest to ``name`` in definition order, as 'name (Type)' text."""
    names = [n for n, _ in model.named_modules()]
    at = names.index(name) if name in names else 0
    foldable = [(abs(i - at), n, type(m).__name__) for i, (n, m) in enumerate(model.named_modules())
                if n and _fold_problem(m) is None]
    nearest = sorted(foldable)[:count]
    return ", ".join(f"{n} ({t})" for _, n, t in nearest) or "none in this model"


def _resolve(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    if isinstance(names, str) or not names:
        raise UserError("give the layers to attach to as a non-empty list of names (see `gmn-debias layers`)")
    if len(set(names)) != len(names):
        raise UserError(f"layer names repeat: {', '.join(names)}")
    found = []
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.4)
            hint = f"closest: {', '.join(close)}" if close else "see `gmn-debias layers` for the names"
            raise UserError(f"no layer named {name!r} in the model; {hint}")
        problem = _fold_problem(modules[name])
        if problem is not None:
            raise UserError(f"cannot attach GroupMixNorm to {name!r}: {problem}; "
                            f"foldable neighbours: {_neighbours(model, name)}")
        found.append(modules[name])
    return found


class GMNHandle:
    """The GroupMixNorm layers attached to a model, and the hooks that run them.

    Train inside ``with handle.batch(groups, labels): model(x)``; in ``model.eval()`` the
    hooks apply each layer's eval affine map and need no groups.
    """

    def __init__(self, model: nn.Module, names: list[str], modules: list[nn.Module],
                 layers: nn.ModuleDict) -> None:
        self.model = model
        self.names = names
        self.layers = layers
        self._modules = modules
        self._groups: Tensor | None = None
        self._labels: Tensor | None = None
        self._active = False
        self._fired = dict.fromkeys(names, 0)
        self._hooks = [module.register_forward_hook(self._make_hook(name))
                       for name, module in zip(names, modules)]
        self._hooks.append(model.register_forward_pre_hook(self._reset_counts))
        self._hooks.append(model.register_forward_hook(self._check_counts))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def layer(self, name: str) -> GroupMixNorm:
        """The GroupMixNorm attached at ``name``."""
        return self.layers[self._key(name)]  # type: ignore[return-value]

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.layers.parameters()

    def settings(self) -> dict[str, Any]:
        """The GMN settings, JSON-able, for a checkpoint's provenance."""
        first = self.layer(self.names[0])
        return {"layers": list(self.names), "alpha": first.alpha, "p": first.p, "eps": first.eps,
                "momentum": first.momentum, "inference": first.inference, "target": first.target}

    @contextlib.contextmanager
    def batch(self, groups: Tensor, labels: Tensor | None = None) -> Iterator[None]:
        """Feed this batch's group ids (and labels, for target="eo") to every hook."""
        self._require_attached()
        self._groups, self._labels, self._active = groups, labels, True
        try:
            yield
        finally:
            self._groups, self._labels, self._active = None, None, False

    @contextlib.contextmanager
    def deployed(self) -> Iterator[None]:
        """Run the hooks as they will ship (eval map) while the rest of the model keeps training."""
        modules = [m for m in self._modules if m.training]
        for module in modules:
            module.train(False)
        try:
            yield
        finally:
            for module in modules:
                module.train(True)

    def _make_hook(self, name: str):  # noqa: ANN202 - a torch hook signature
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise UserError(f"layer {name!r} returned {type(output).__name__}, not a tensor; "
                                f"attach to one of: {_neighbours(self.model, name)}")
            self._fired[name] += 1
            layer = self.layer(name)
            layer.train(module.training)
            if module.training and not self._active:
                raise UserError(f"layer {name!r} ran in training mode outside `with handle.batch(groups)`: "
                                "GroupMixNorm needs the batch's group ids")
            # Linear features are the last dim; GroupMixNorm wants them at dim 1.
            moved = isinstance(module, nn.Linear) and output.dim() > 2
            out = output.movedim(-1, 1) if moved else output
            out = layer(out, self._groups, self._labels) if module.training else layer(out)
            return out.movedim(1, -1) if moved else out
        return hook

    def _reset_counts(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._fired = dict.fromkeys(self.names, 0)

    def _check_counts(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._active:
            return
        wrong = {n: c for n, c in self._fired.items() if c != 1}
        if wrong:
            detail = ", ".join(f"{n!r} ran {c} times" for n, c in wrong.items())
            raise UserError(f"each hooked layer must run exactly once per forward pass: {detail}")

    def _require_attached(self) -> None:
        if not self._hooks:
            raise UserError("this GroupMixNorm handle was removed or folded; attach again")

    def remove(self) -> None:
        """Detach the hooks; the model is as before attach()."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Merge each layer's eval affine map into its module's weight and bias, then detach.

        Returns the model, which keeps its architecture and state_dict keys.
        """
        self._require_attached()
        maps = []
        for name, module in zip(self.names, self._modules):
            scale, shift = self.layer(name).eval_affine()
            bias = getattr(module, "bias", None)
            if bias is None and bool(shift.ne(0).any()):
                raise UserError(f"cannot fold into {name!r}: it has no bias to take the non-zero shift; "
                                'use inference="identity" or attach to a layer with a bias')
            maps.append((module, scale, shift))
        for module, scale, shift in maps:
            weight = module.weight
            view = (-1,) + (1,) * (weight.dim() - 1)
            weight.mul_(scale.to(weight).view(view))
            if module.bias is not None:
                module.bias.mul_(scale.to(module.bias)).add_(shift.to(module.bias))
        self.remove()
        return self.model


def attach(model: nn.Module, layer_names: Sequence[str], **layer_kwargs: Any) -> GMNHandle:
    """Hook a GroupMixNorm (built with ``layer_kwargs``) onto each named layer's output."""
    _refuse_uninjectable(model)
    modules = _resolve(model, layer_names)
    if layer_kwargs.get("inference") == "running":
        no_bias = [n for n, m in zip(layer_names, modules) if getattr(m, "bias", None) is None]
        if no_bias:
            raise UserError(f'inference="running" folds a shift into the bias, but {", ".join(no_bias)} '
                            'has no bias; use inference="identity" or a layer with a bias')
    layers = nn.ModuleDict()
    for name, module in zip(layer_names, modules):
        try:
            layer = GroupMixNorm(_features(module), **layer_kwargs)
        except TypeError as exc:  # an unknown setting name
            raise UserError(f"bad GroupMixNorm setting: {exc}") from None
        layers[GMNHandle._key(name)] = layer.to(module.weight.device)
    return GMNHandle(model, list(layer_names), modules, layers)


def candidate_layers(model: nn.Module, sample_input: Tensor | None = None) -> list[LayerInfo]:
    """Leaf layers of ``model`` and whether GroupMixNorm can be attached and folded there.

    With ``sample_input`` the model runs once (eval mode, no grad) to record output shapes.
    """
    _refuse_uninjectable(model)
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    shapes: dict[str, tuple[int, ...] | None] = {}
    if sample_input is not None:
        def record(name: str):  # noqa: ANN202 - a torch hook factory
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                shapes[name] = tuple(output.shape) if isinstance(output, Tensor) else None
            return hook
        handles = [m.register_forward_hook(record(n)) for n, m in leaves]
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(sample_input)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
    rows = []
    for name, module in leaves:
        problem = _fold_problem(module)
        note = problem or ""
        if problem is None and getattr(module, "bias", None) is None:
            note = 'no bias: inference="identity" only'
        if sample_input is not None and name not in shapes:
            note = "; ".join(filter(None, [note, "not run by forward()"]))
        elif name in shapes and shapes[name] is None:
            note = "; ".join(filter(None, [note, "output is not a tensor"]))
        tensor_out = not (name in shapes and shapes[name] is None)
        rows.append(LayerInfo(name, type(module).__name__, shapes.get(name), problem is None and tensor_out, note))
    return rows
