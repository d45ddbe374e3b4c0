"""``fit`` end to end: load → split → fine-tune candidates → select → fold → save → report.

Nothing is written until every step has succeeded, and every file is written atomically,
so an interrupted or failed run leaves no partial output.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import (
    LoadedModel,
    load_model,
    model_input_width,
    require_eager,
    save_model,
)
from .data import LabelledData, load_labelled
from .errors import UserError
from .files import (
    atomic_write_texts,
    ensure_not_input,
    ensure_writable_dir,
    sha256_file,
)
from .finetune import (
    TARGET_METRIC,
    EpochResult,
    Setting,
    Tensors,
    attach_setting,
    evaluate,
    evaluate_at_rate,
)
from .fit_report import candidate_rows, metric_changes, render_markdown, verdict
from .hooks import candidate_layers
from .predict import predict_scores
from .schema import FeatureSchema
from .select import Selector, search
from .split import stratified_split

log = logging.getLogger(__name__)

#: Per-target search defaults, chosen with benchmarks/efficacy.py (README, "Efficacy").
#: Every alpha x lr x gap_penalty is one setting trained for ``epochs``; with
#: ``stats_only`` one more candidate only updates GroupMixNorm's running statistics
#: (learning rate 0), which lowers the gap at no accuracy cost when training cannot.
TARGET_DEFAULTS: dict[str, dict[str, Any]] = {
    "dp": {"alpha": [0.5], "lr": [1e-4], "gap_penalty": [0.0, 20.0], "epochs": 8, "inference": "running"},
    "eo": {"alpha": [0.5], "lr": [1e-4, 3e-4], "gap_penalty": [0.0], "epochs": 8, "inference": "running"},
    "eod": {"alpha": [0.5], "lr": [1e-4, 3e-4], "gap_penalty": [0.0], "epochs": 8, "inference": "running"},
}


@dataclass
class FitConfig:
    """Every option of ``gmn-debias fit``; the resolved copy is saved beside the outputs."""

    model: Path
    data: Path
    protected: list[str]
    label: str | None = None
    positive: str | None = None
    eval: Path | None = None
    val: Path | None = None
    out: Path | None = None
    target: str = "dp"
    max_ap_drop: float = 0.01
    seed: int = 0
    device: str = "auto"
    layers: list[str] = field(default_factory=lambda: ["auto"])
    alpha: list[float] | None = None
    lr: list[float] | None = None
    gap_penalty: list[float] | None = None
    epochs: int | None = None
    inference: str | None = None
    stats_only: bool = True
    batch_size: int = 256
    val_fraction: float = 0.3
    threshold: float = 0.5
    threads: int | None = None
    force: bool = False
    max_selection_drop: float | None = None
    train_batchnorm: bool = False
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_checkpoint: bool = False
    schema: Path | None = None
    missing_groups: str = "error"
    normalize_labels: bool = False
    strict: bool = False
    config: Path | None = None

    def resolved(self) -> "FitConfig":
        """A copy with the target's defaults filled in where an option was left unset; checked."""
        if self.target not in TARGET_METRIC:
            raise UserError(f"--target must be one of {', '.join(TARGET_METRIC)}, got {self.target!r}")
        defaults = TARGET_DEFAULTS[self.target]
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()}
        cfg = replace(self, **values)
        cfg._check()
        return cfg

    def _check(self) -> None:
        """One clear error for a value that cannot mean anything, before any work starts."""
        problems = [
            ("--alpha", self.alpha, lambda v: all(a > 0 for a in v), "numbers > 0"),
            ("--lr", self.lr, lambda v: all(a >= 0 for a in v), "numbers >= 0"),
            ("--gap-penalty", self.gap_penalty, lambda v: all(a >= 0 for a in v), "numbers >= 0"),
            ("--epochs", self.epochs, lambda v: v >= 1, "at least 1"),
            ("--batch-size", self.batch_size, lambda v: v >= 2, "at least 2"),
            ("--max-ap-drop", self.max_ap_drop, lambda v: v >= 0, "a number >= 0"),
            ("--val-fraction", self.val_fraction, lambda v: 0 < v < 1, "between 0 and 1"),
            ("--max-selection-drop", self.max_selection_drop, lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
            ("--threads", self.threads, lambda v: v is None or v >= 1, "at least 1"),
            ("--inference", self.inference, lambda v: v in ("running", "identity"), "running or identity"),
            ("--missing-groups", self.missing_groups, lambda v: v in ("error", "drop", "group"), "error, drop or group"),
        ]
        for flag, value, ok, expected in problems:
            if not ok(value):
                raise UserError(f"{flag} must be {expected}, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able values (paths as text); the config file itself is left out."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "config"}

    def inputs(self) -> list[Path | None]:
        """Every file this run reads: none of them may be overwritten."""
        return [self.model, self.data, self.eval, self.val, self.schema, self.config]


@dataclass
class FitOutcome:
    """What ``fit`` produced: the report object and where the files went."""

    report: dict[str, Any]
    out_dir: Path
    checkpoint: Path
    files: list[Path]


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available; an explicit CUDA request without CUDA is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


REPORT_FILES = ("report.json", "report.md", "config.yaml")

#: Below this many parameters a CPU fine-tune runs on one intra-op thread: its kernels are
#: too small to split, and idle-spinning threads cost more than they give (the sample
#: ``fit`` took 8 s on one thread against 30 s on two on a busy 2-core machine).
SMALL_MODEL_PARAMS = 1_000_000


def training_threads(requested: int | None, model: torch.nn.Module, device: torch.device) -> int:
    """Intra-op threads for fine-tuning: as asked, else 1 for small models on CPU."""
    if requested:
        return requested
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    return 1 if device.type == "cpu" and small else torch.get_num_threads()


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op thread count for a block, then restore it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_layers(model: torch.nn.Module, sample: torch.Tensor) -> list[str]:
    """Every foldable hidden layer: the foldable candidates minus the output layer."""
    foldable = [info.name for info in candidate_layers(model, sample) if info.foldable]
    if len(foldable) < 2:
        raise UserError(
            "cannot choose layers automatically: the model has no foldable hidden layer; "
            "name them with --layers (see `gmn-debias layers MODEL`)"
        )
    return foldable[:-1]


def to_tensors(data: LabelledData, group_names: list[str]) -> Tensors:
    """Attach integer group ids (indices into the sorted list of all group labels)."""
    assert data.x is not None
    ids = torch.as_tensor(np.searchsorted(np.asarray(group_names), np.asarray(data.groups, dtype=str)), dtype=torch.long)
    weights = None if data.weights is None else torch.as_tensor(data.weights, dtype=torch.float32)
    return Tensors(data.x, data.y.long(), ids, np.asarray(data.groups), weights)


def subset(data: Tensors, idx: np.ndarray) -> Tensors:
    """Rows ``idx`` of ``data``."""
    t = torch.as_tensor(idx, dtype=torch.long)
    w = None if data.weights is None else data.weights[t]
    return Tensors(data.x[t], data.y[t], data.group_ids[t], data.groups[idx], w)


def settings_grid(cfg: FitConfig, layers: list[str]) -> list[Setting]:
    """The candidate recipes of a resolved config: alpha x lr x gap penalty (+ stats only)."""
    assert cfg.alpha is not None and cfg.lr is not None and cfg.gap_penalty is not None
    assert cfg.epochs is not None and cfg.inference is not None
    mix = "dp" if cfg.target == "dp" else "eo"
    common = dict(epochs=cfg.epochs, mix_target=mix, inference=cfg.inference)
    grid = [
        Setting(tuple(layers), alpha=a, lr=lr, gap_penalty=gap, **common)  # type: ignore[arg-type]
        for a in cfg.alpha
        for lr in cfg.lr
        for gap in cfg.gap_penalty
    ]
    if cfg.stats_only and cfg.inference == "running":
        grid += [Setting(tuple(layers), alpha=a, lr=0.0, epochs=1, mix_target=mix, inference="running")
                 for a in cfg.alpha]
    return grid


def load_inputs(
    cfg: FitConfig,
) -> tuple[LoadedModel, FeatureSchema | None, LabelledData, LabelledData | None, LabelledData | None]:
    loaded = load_model(
        cfg.model, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, trust_checkpoint=cfg.trust_checkpoint
    )
    require_eager(loaded)
    schema = FeatureSchema.from_yaml(cfg.schema) if cfg.schema is not None else loaded.schema
    common: dict[str, Any] = dict(
        schema=schema,
        input_width=model_input_width(loaded.model),
        label=cfg.label,
        positive=cfg.positive,
        protected=cfg.protected,
        missing_groups=cfg.missing_groups,
        normalize_labels=cfg.normalize_labels,
        strict=cfg.strict,
    )
    data = load_labelled(cfg.data, **common)
    val = load_labelled(cfg.val, **common) if cfg.val is not None else None
    held = load_labelled(cfg.eval, **common) if cfg.eval is not None else None
    return loaded, schema, data, val, held


def run_fit(cfg: FitConfig, on_epoch: Callable[[Setting, EpochResult], None] | None = None) -> FitOutcome:
    """Run ``fit``; raise :class:`UserError` for bad input, write outputs only at the end."""
    started = time.perf_counter()
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    out_dir = cfg.out if cfg.out is not None else cfg.model.parent / f"{cfg.model.stem}-debiased"
    checkpoint_path = out_dir / f"{cfg.model.stem}.debiased.safetensors"
    for target in (checkpoint_path, *(out_dir / name for name in REPORT_FILES)):
        ensure_not_input(target, cfg.inputs())
    ensure_writable_dir(out_dir)

    loaded, schema, data, val_data, held_data = load_inputs(cfg)
    parts = [d for d in (data, val_data, held_data) if d is not None]
    group_names = sorted({str(g) for d in parts for g in d.groups})
    names, counts = np.unique(np.asarray(data.groups, dtype=str), return_counts=True)
    if len(names) < 2:
        raise UserError(
            f"{cfg.data}: the protected column(s) {', '.join(cfg.protected)} hold a single group "
            f"({names[0]!r}); GroupMixNorm needs at least two groups to mix"
        )
    if int((counts >= 4).sum()) < 2:
        sizes = ", ".join(f"{str(n)!r}: {int(c)}" for n, c in zip(names, counts))
        raise UserError(
            f"{cfg.data}: GroupMixNorm needs at least two groups with 4 or more rows (to train and validate "
            f"on both); the groups have {sizes}"
        )
    full = to_tensors(data, group_names)
    if val_data is None:
        strata = np.char.add(np.char.add(full.groups.astype(str), "|"), full.y.numpy().astype(str))
        train_idx, val_idx = stratified_split(strata, cfg.val_fraction, cfg.seed)
        train, val = subset(full, train_idx), subset(full, val_idx)
    else:
        train, val = full, to_tensors(val_data, group_names)
    held = to_tensors(held_data, group_names) if held_data is not None else val

    base = loaded.model.float().eval()
    positive_index = None
    layers = default_layers(base, train.x[:2]) if cfg.layers in ([], ["auto"]) else list(cfg.layers)
    settings = settings_grid(cfg, layers)
    with cpu_threads(training_threads(cfg.threads, base, device)):
        found = search(
            base, settings, train, val, target=cfg.target, max_ap_drop=cfg.max_ap_drop, seed=cfg.seed,
            device=device, force=cfg.force, max_selection_drop=cfg.max_selection_drop,
            batch_size=cfg.batch_size, train_batchnorm=cfg.train_batchnorm,
            positive_index=positive_index, threshold=cfg.threshold, on_epoch=on_epoch,
        )
    best = found.best
    _warn_undefined(found.baseline, TARGET_METRIC[cfg.target], "validation rows")
    final, fold_check = build_final_model(base, settings, best, val.x, positive_index)
    before = evaluate(base, held, positive_index, cfg.threshold, protected=cfg.protected)
    after = evaluate(final, held, positive_index, cfg.threshold, protected=cfg.protected)
    if held is not val:
        _warn_undefined(before, TARGET_METRIC[cfg.target], f"rows of {cfg.eval}")
    rate = before["metrics"]["selection_rate"]
    matched = evaluate_at_rate(final, held, rate, positive_index, cfg.protected) if rate else None
    provenance = {
        "tool": "gmn-debias",
        "version": __version__,
        "source_checkpoint": str(cfg.model),
        "source_sha256": loaded.sha256,
        "data_sha256": sha256_file(cfg.data),
        "seed": cfg.seed,
    }
    gmn_settings = None if best is None else {**asdict(settings[best[0]]), "epoch": best[1].epoch}
    report = build_report(
        cfg=cfg, selector=found.selector, settings=settings, best=best, candidates=found.candidates,
        baseline_val=found.baseline, before=before, after=after, matched=matched, held_source="eval" if cfg.eval else "validation",
        held_rows=len(held), provenance=provenance, gmn_settings=gmn_settings, fold_check=fold_check,
        device=device, checkpoint=checkpoint_path, wall_s=time.perf_counter() - started,
    )
    files = write_outputs(cfg, loaded, schema, final, out_dir, checkpoint_path, report, provenance, gmn_settings, val.x[:64])
    return FitOutcome(report, out_dir, checkpoint_path, files)


def _warn_undefined(audit: dict[str, Any], key: str, where: str) -> None:
    """An undefined targeted gap makes the run pointless; say so instead of 'undefined → undefined'."""
    if audit["metrics"].get(key) is None:
        reason = audit.get("undefined", {}).get(key, "see the report")
        log.warning("%s is undefined on the %s (%s): nothing can be measured against it", key, where, reason)


def build_final_model(
    base: torch.nn.Module,
    settings: list[Setting],
    best: tuple[int, EpochResult] | None,
    check_x: torch.Tensor,
    positive_index: int | None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the chosen candidate, fold GroupMixNorm into it, and prove the fold is exact.

    The folded model must reproduce the hooked eval-mode scores (float32, on CPU) with no
    prediction flipped; otherwise this is a bug, not a user error.
    """
    if best is None:
        return copy.deepcopy(base), {"folded": False}
    index, result = best
    assert result.state is not None
    model = copy.deepcopy(base).cpu()
    model.load_state_dict(result.state["model"])
    setting = settings[index]
    handle = attach_setting(model, setting)
    if handle is None:  # plain fine-tuning: nothing to fold
        return model.eval(), {"folded": False}
    handle.layers.load_state_dict(result.state["gmn"])
    model.eval()
    handle.layers.eval()
    hooked = predict_scores(model, check_x.cpu(), positive_index=positive_index)
    handle.fold()
    folded = predict_scores(model, check_x.cpu(), positive_index=positive_index)
    max_diff = float(np.max(np.abs(hooked - folded))) if len(hooked) else 0.0
    flips = int(np.sum((hooked >= 0.5) != (folded >= 0.5)))
    if max_diff > 1e-5 or flips:
        raise RuntimeError(f"folding changed the model's scores (max diff {max_diff:.3g}, {flips} flips)")
    return model, {"folded": True, "rows_checked": int(len(hooked)), "max_abs_score_diff": max_diff,
                   "prediction_flips": flips}


def build_report(
    *, cfg: FitConfig, selector: Selector, settings: list[Setting], best: tuple[int, EpochResult] | None,
    candidates: list[dict[str, Any]], baseline_val: dict[str, Any], before: dict[str, Any],
    after: dict[str, Any], matched: dict[str, Any] | None, held_source: str, held_rows: int, provenance: dict[str, Any],
    gmn_settings: dict[str, Any] | None, fold_check: dict[str, Any], device: torch.device,
    checkpoint: Path, wall_s: float,
) -> dict[str, Any]:
    """Assemble ``report.json``: before/after in the audit layout plus how the choice was made."""
    target_key = TARGET_METRIC[cfg.target]
    picked = None if best is None else (best[0], best[1].epoch)
    b, a = before["metrics"].get(target_key), after["metrics"].get(target_key)
    report: dict[str, Any] = {
        "tool": "gmn-debias",
        "version": __version__,
        "command": "fit",
        "checkpoint": str(checkpoint),
        "evaluated_on": {
            "source": held_source,
            "path": str(cfg.eval) if held_source == "eval" else str(cfg.data),
            "rows": held_rows,
        },
        "target": {"name": cfg.target, "metric": target_key, "max_ap_drop": cfg.max_ap_drop},
        "selection": {
            "status": selector.status,
            "setting": None if best is None else asdict(settings[best[0]]),
            "setting_text": None if best is None else settings[best[0]].describe(),
            "epoch": None if best is None else best[1].epoch,
        },
        "before": before,
        "after": after,
        "change": metric_changes(before, after),
        "at_input_selection_rate": None if matched is None else {
            "selection_rate": before["metrics"]["selection_rate"],
            "threshold": matched["threshold"],
            "metrics": {k: matched["metrics"][k] for k in (
                "demographic_parity_difference", "demographic_parity_ratio",
                "equal_opportunity_difference", "equalized_odds_difference", "accuracy")},
        },
        "halved": b is not None and a is not None and a <= b / 2,
        "validation": {
            "baseline": baseline_val["metrics"],
            "candidates": candidate_rows(candidates, picked),
        },
        "settings": [s.describe() for s in settings],
        "gmn": gmn_settings,
        "fold_check": fold_check,
        "config": cfg.to_dict(),
        "provenance": {
            **provenance,
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "wall_time_s": round(wall_s, 2),
        },
    }
    report["verdict"] = verdict(report)
    return report


def write_outputs(
    cfg: FitConfig, loaded: LoadedModel, schema: FeatureSchema | None, model: torch.nn.Module, out_dir: Path,
    checkpoint: Path,
    report: dict[str, Any], provenance: dict[str, Any], gmn_settings: dict[str, Any] | None,
    check_x: torch.Tensor,
) -> list[Path]:
    """Write checkpoint(s), report.json, report.md and config.yaml, each atomically."""
    import json

    import yaml

    inputs = cfg.inputs()
    targets = [checkpoint, *(out_dir / name for name in REPORT_FILES)]
    pt_path = checkpoint.with_suffix(".pt") if loaded.format in ("pt", "pickle") else None
    for path in targets + ([pt_path] if pt_path else []):
        ensure_not_input(path, inputs)
    written = []
    for path in [checkpoint] + ([pt_path] if pt_path else []):
        save_model(model.cpu(), path, arch=loaded.arch, schema=schema, provenance=provenance,
                   gmn=gmn_settings, inputs=inputs, check_input=check_x.cpu())
        written.append(path)
    atomic_write_texts({
        out_dir / "report.json": json.dumps(report, indent=2, allow_nan=False) + "\n",
        out_dir / "report.md": render_markdown(report),
        out_dir / "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
    })
    return written + targets[1:]
