"""Load a user's checkpoint as an ``nn.Module``, safely; save one with its provenance.

Loading is safe by default: ``.safetensors`` holds only tensors, and ``.pt``/``.pth`` are
read with ``torch.load(weights_only=True)``. A file that needs real unpickling (a whole
pickled model, numpy scalars, ``argparse.Namespace``) is refused with the offending
global's name, unless the user passes ``--trust-checkpoint``: unpickling can run code.
The format is sniffed from the file's bytes, not trusted from its suffix.

A state_dict needs an architecture: from the metadata of checkpoints this tool wrote,
or from ``--arch package.module:factory``. Common wrappers (``{"state_dict": ...}``,
``module.``/``_orig_mod.`` key prefixes) are unwrapped, then keys must match exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model as _st_save_model
from torch import nn

from . import __version__
from .archs import build_arch
from .errors import UserError
from .files import atomic_path, ensure_not_input, sha256_file
from .schema import FeatureSchema

log = logging.getLogger(__name__)

META_PREFIX = "gmn_debias."
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many offending names an error message lists


@dataclass
class LoadedModel:
    """A model ready for inference (``model`` is in eval mode) and where it came from.

    ``arch`` is ``{"name": ..., "kwargs": {...}}`` (JSON-able, to re-save with) or None for a
    pickled/TorchScript model; ``metadata`` holds the safetensors metadata, with this tool's
    own entries JSON-decoded and the ``gmn_debias.`` prefix dropped.
    """

    model: nn.Module
    path: Path
    format: str  # "safetensors" | "pt" | "torchscript" | "pickle"
    sha256: str
    arch: dict[str, Any] | None = None
    schema: FeatureSchema | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def scripted(self) -> bool:
        """True for a TorchScript module: it can be scored but not hooked."""
        return isinstance(self.model, torch.jit.ScriptModule)


def require_eager(loaded: LoadedModel) -> nn.Module:
    """Return the eager model, or refuse a TorchScript one (hooks never run inside TorchScript)."""
    if loaded.scripted:
        raise UserError(
            f"{loaded.path} is a TorchScript archive: it can be audited, but GroupMixNorm cannot be attached "
            "(TorchScript runs no Python hooks); provide the eager model: pass --arch package.module:factory "
            "(and --arch-kwargs) to load these weights into your class, or a state_dict .pt/.safetensors"
        )
    return loaded.model


def parse_arch_kwargs(arch_kwargs: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--arch-kwargs`` arrives as JSON text (or a mapping from a YAML config)."""
    if arch_kwargs is None:
        return {}
    if isinstance(arch_kwargs, Mapping):
        return dict(arch_kwargs)
    try:
        value = json.loads(arch_kwargs)
    except json.JSONDecodeError as exc:
        raise UserError(f"--arch-kwargs is not valid JSON ({exc.msg}); example: '{{\"in_dim\": 8}}'") from None
    if not isinstance(value, dict):
        raise UserError("--arch-kwargs must be a JSON object, e.g. '{\"in_dim\": 8}'")
    return value


# --------------------------------------------------------------------------- reading
def _sniff(path: Path) -> str:
    """'safetensors', 'torchscript' or 'pt' (a torch.save zip or legacy pickle), from the bytes."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        return "torchscript" if any(n.endswith("/constants.pkl") for n in names) else "pt"
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    return "pt"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw_meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        if key.startswith(META_PREFIX):
            try:
                meta[key[len(META_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"{path}: metadata entry {key!r} is not valid JSON") from None
        else:
            meta[key] = value
    return tensors, meta


def _offending_global(message: str) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else "a non-tensor object"


def _load_failure(path: Path, exc: BaseException) -> UserError:
    """A corrupt file's error, without torch's advice to turn the safe loader off."""
    reason = _first_line(exc)
    if "weights_only" in reason or "Weights only" in reason:
        reason = "the file is damaged or is not a PyTorch checkpoint"
    return UserError(f"{path}: not a readable PyTorch checkpoint ({reason})")


def _torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; real unpickling only when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):
            raise _load_failure(path, exc) from None
        culprit = _offending_global(str(exc))
        if not trust:
            raise UserError(
                f"{path} cannot be loaded safely: it contains the Python object {culprit}, not only tensors; "
                "either pass --trust-checkpoint to unpickle it (only for files you trust: unpickling can run code), "
                "or re-save it as a state_dict: torch.save(model.state_dict(), 'model.pt')"
            ) from None
    except Exception as exc:  # noqa: BLE001 - the safe loader fails in many ways on a corrupt file
        raise _load_failure(path, exc) from None
    log.warning("unpickling %s because of --trust-checkpoint: this runs any code the file contains", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - anything a pickle raises is the file's fault
        raise UserError(f"{path}: unpickling failed ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap(obj: Any, path: Path) -> nn.Module | dict[str, torch.Tensor]:
    """A module, or a flat ``name -> tensor`` state_dict, from what ``torch.load`` returned."""
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict or a model")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, (Mapping, nn.Module)):
            log.info("%s: using its %r entry", path, key)
            return _unwrap(inner, path)
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others or not obj:
        raise UserError(
            f"{path} is not a state_dict: entries {', '.join(others[:_SHOW]) or '(none)'} are not tensors "
            f"and there is no {' / '.join(map(repr, _WRAPPER_KEYS))} entry"
        )
    return {str(k): v for k, v in obj.items()}


# ----------------------------------------------------------------------- matching keys
def _strip_prefixes(state: dict[str, torch.Tensor], expected: Iterable[str], path: Path) -> dict[str, torch.Tensor]:
    """Drop a ``module.``/``_orig_mod.`` prefix every key has (and the model's keys do not)."""
    expected = list(expected)
    while True:
        for prefix in _KEY_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
                log.info("%s: stripped the %r prefix from every key (a DataParallel/DDP or torch.compile wrapper)", path, prefix)
                state = {k[len(prefix):]: v for k, v in state.items()}
                break
        else:
            return state


def _alias_groups(expected: Mapping[str, torch.Tensor]) -> dict[str, set[str]]:
    """Names that share storage (tied weights): safetensors keeps only one of each group."""
    by_storage: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    for name, tensor in expected.items():
        if tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            by_storage.setdefault(key, set()).add(name)
    return {name: group for group in by_storage.values() if len(group) > 1 for name in group}


def _names(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | Path, arch_name: str) -> None:
    """Load ``state`` into ``model`` strictly, with one clear error listing every kind of mismatch."""
    path = Path(source)
    expected = model.state_dict()
    state = _strip_prefixes(dict(state), expected, path)
    aliases = _alias_groups(expected)
    missing = [k for k in expected if k not in state and not (aliases.get(k, set()) & state.keys())]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)} in the model"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes)}")
    if problems:
        raise UserError(f"{path} does not match architecture {arch_name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- loading
def _read_any(path: Path, trust: bool) -> tuple[str, nn.Module | dict[str, torch.Tensor], dict[str, Any]]:
    """(format, a module or a state_dict, this tool's metadata) for any supported file."""
    kind = _sniff(path)
    if kind == "safetensors":
        tensors, meta = _read_safetensors(path)
        return kind, tensors, meta
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return kind, torch.jit.load(str(path), map_location="cpu"), {}
            except RuntimeError as exc:
                raise UserError(f"{path}: not a readable TorchScript archive ({_first_line(exc)})") from None
    content = _unwrap(_torch_load(path, trust), path)
    return ("pickle" if isinstance(content, nn.Module) else "pt"), content, {}


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """Load a checkpoint (safetensors, state_dict .pt, pickled model, TorchScript) in eval mode.

    ``arch``/``arch_kwargs`` (the ``--arch``/``--arch-kwargs`` options) override the
    architecture stored in the file; with TorchScript they load its weights into an eager
    model, which is the way to make a scripted model injectable.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    kwargs = parse_arch_kwargs(arch_kwargs)
    if kwargs and arch is None:
        raise UserError("--arch-kwargs needs --arch (the architecture they are passed to)")
    kind, content, meta = _read_any(path, trust_checkpoint)
    if arch is not None:
        arch_info: dict[str, Any] | None = {"name": arch, "kwargs": kwargs}
        model = build_arch(arch, kwargs, allow_import=True)
    elif isinstance(content, nn.Module):
        arch_info, model = None, content
    elif isinstance(meta.get("arch"), Mapping) and isinstance(meta["arch"].get("name"), str):
        arch_info = {"name": meta["arch"]["name"], "kwargs": dict(meta["arch"].get("kwargs") or {})}
        model = build_arch(arch_info["name"], arch_info["kwargs"], allow_import=False)
    else:
        raise UserError(
            f"{path} holds only weights (a state_dict) and no architecture; name it with "
            "--arch package.module:factory (or a built-in: mlp) and --arch-kwargs '{\"in_dim\": ...}'"
        )
    if arch_info is not None:
        state = content.state_dict() if isinstance(content, nn.Module) else content
        load_weights(model, state, source=path, arch_name=arch_info["name"])

    schema = FeatureSchema.from_dict(meta["schema"], source=f"{path} (schema metadata)") if meta.get("schema") else None
    model.eval()
    return LoadedModel(model, path, kind, sha256_file(path), arch_info, schema, meta)


def model_input_width(model: nn.Module) -> int | None:
    """Input width of a tabular model (its first parametrised layer), or None if unknown.

    Used to check a CSV's feature count before any forward pass; convolutional, embedding
    and recurrent inputs have no single width, so they return None.
    """
    for module in model.modules():
        if next(module.children(), None) is not None or next(module.parameters(recurse=False), None) is None:
            continue
        kind = getattr(module, "original_name", type(module).__name__)  # TorchScript keeps the class name here
        if kind == "Linear":
            width = int(module.weight.shape[1])
            return width or None  # LazyLinear before its first call
        if kind == "BatchNorm1d":
            return int(module.weight.shape[0])
        return None
    return None


# ---------------------------------------------------------------------------- saving
def _read_weights(path: Path, kind: str) -> dict[str, torch.Tensor]:
    if kind == "safetensors":
        return _read_safetensors(path)[0]
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)  # type: ignore[return-value]


def _sort_metadata(path: Path) -> None:
    """Rewrite the safetensors header with its metadata keys sorted, in place.

    safetensors writes metadata in hash-map order, which changes from run to run; sorted,
    the same model gives the same bytes (and sha256) every time. The header keeps its
    length (JSON reordered, padded with spaces as the format allows).
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:
            fh.seek(8)
            fh.write(text.ljust(size, b" "))


def _check_reload(
    model: nn.Module, written: Path, dest: Path, kind: str, arch: Mapping[str, Any] | None, check_input: torch.Tensor | None
) -> None:
    """Reload what was written the way a user would; outputs on ``check_input`` must match exactly.

    With an architecture the file is rebuilt by :func:`load_model` (so the stored metadata
    is exercised too); without one (a pickled model), its weights go into a copy of ``model``.
    """
    if arch is not None:
        try:
            clone = load_model(written, arch=arch["name"], arch_kwargs=arch.get("kwargs") or {}).model
        except UserError as exc:  # name the destination, not the temporary file
            raise UserError(f"not saved: {str(exc).replace(str(written), str(dest))}") from None
    else:
        clone = copy.deepcopy(model)
        load_weights(clone, _read_weights(written, kind), source=written, arch_name=type(model).__name__)
    if check_input is None:
        return
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    clone.to(device).eval()
    try:
        with torch.no_grad():
            same = torch.equal(model(check_input.to(device)), clone(check_input.to(device)))
    finally:
        model.train(was_training)
    if not same:
        raise RuntimeError(f"reload check failed: {dest} would give different outputs from the model it was saved from")


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: Mapping[str, Any] | None,
    schema: FeatureSchema | None,
    provenance: Mapping[str, Any],
    gmn: Mapping[str, Any] | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    check_input: torch.Tensor | None = None,
) -> str:
    """Write ``model``'s weights atomically and return the file's sha256.

    ``.safetensors`` carries the architecture, schema, provenance and GroupMixNorm settings
    as metadata (strings; JSON where structured), so it reloads with no other input;
    ``.pt``/``.pth`` is a plain state_dict that any PyTorch user can load. The written file
    is read back before it replaces anything (see ``check_input``); ``inputs`` are never
    overwritten.
    """
    path = Path(path)
    ensure_not_input(path, inputs)
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError("cannot save a TorchScript module as a state_dict checkpoint")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise UserError(f"output {path}: use a .safetensors (recommended) or .pt/.pth file name")
    kind = "safetensors" if suffix == ".safetensors" else "pt"
    entries: dict[str, Any] = {
        "arch": dict(arch) if arch is not None else None,
        "schema": schema.to_dict() if schema is not None else None,
        "provenance": {"tool": "gmn-debias", "version": __version__, **provenance},
        "gmn": dict(gmn) if gmn is not None else None,
    }
    metadata = {"format": "pt"} | {META_PREFIX + k: json.dumps(v) for k, v in entries.items() if v is not None}
    with atomic_path(path) as tmp:
        if kind == "safetensors":
            _st_save_model(model, str(tmp), metadata=metadata, force_contiguous=True)
            _sort_metadata(tmp)
        else:
            log.info("%s: a .pt file holds only the weights; use .safetensors to keep the schema and provenance", path)
            torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp)
        _check_reload(model, tmp, path, kind, arch, check_input)
    return sha256_file(path)
