"""Architectures a checkpoint can name, so a bare set of weights becomes a model again.

Checkpoints written by this tool store ``{"name": "mlp", "kwargs": {...}}`` in their
metadata and are rebuilt from the small built-in registry below. A user's own class is
named as ``package.module:factory`` on the command line (as timm or Lightning users do);
that form imports code, so it is honoured only when the user types it, never when a file
asks for it (see :func:`build_arch`'s ``allow_import``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .errors import UserError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


class MLP(nn.Sequential):
    """A plain multilayer perceptron for tabular features.

    Layers are named ``fc1, bn1, act1, drop1, fc2, ..., head`` (``bn``/``drop`` only when
    enabled), so injection points read naturally in ``gmn-debias layers``: a Linear's
    output (``fc1``) or a BatchNorm's (``bn1``) can take GroupMixNorm and be folded back.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (64, 32),
        out_dim: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise UserError(f"unknown MLP activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}")
        if in_dim < 1 or out_dim < 1 or any(int(h) < 1 for h in hidden):
            raise UserError(f"MLP widths must be positive (in_dim={in_dim}, hidden={list(hidden)}, out_dim={out_dim})")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"MLP dropout must be in [0, 1), got {dropout}")
        super().__init__()
        self.in_dim = int(in_dim)
        width = self.in_dim
        for i, h in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(width, int(h)))
            if batchnorm:
                self.add_module(f"bn{i}", nn.BatchNorm1d(int(h)))
            self.add_module(f"act{i}", _ACTIVATIONS[activation]())
            if dropout > 0:
                self.add_module(f"drop{i}", nn.Dropout(dropout))
            width = int(h)
        self.add_module("head", nn.Linear(width, int(out_dim)))


ARCHS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP}


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--arch {spec!r} must be a built-in name ({', '.join(ARCHS)}) or 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--arch {spec!r}: cannot import module {module_name!r} ({exc})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"--arch {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"--arch {spec!r}: {attr!r} is not callable")
    return target


def build_arch(name: str, kwargs: Mapping[str, Any] | None = None, *, allow_import: bool = True) -> nn.Module:
    """Instantiate a registered architecture, or (if allowed) an imported ``module:factory``.

    ``allow_import=False`` is used for names read from a checkpoint file: a file must not
    be able to make us import and call arbitrary code.
    """
    kwargs = dict(kwargs or {})
    if ":" in name:
        if not allow_import:
            raise UserError(
                f"the checkpoint names architecture {name!r}, which would import code; "
                f"pass --arch {name} yourself to allow it"
            )
        factory = _import_factory(name)
    elif name in ARCHS:
        factory = ARCHS[name]
    else:
        close = difflib.get_close_matches(name, list(ARCHS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"unknown architecture {name!r}{hint}: use a built-in name ({', '.join(ARCHS)}) or 'package.module:factory'"
        )
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise UserError(f"architecture {name!r} rejected its keyword arguments {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"architecture {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
