"""Efficacy benchmark: does ``fit`` really debias the sample model, and at what cost?

From the sample model, fine-tune on the sample fine-tuning set (split into train and
validation exactly as ``fit`` does), choose on validation exactly as ``fit`` does, and
evaluate the chosen model on the holdout, over several seeds, for:

- the input model;
- plain fine-tuning with the same budget and the same selection rule (no GroupMixNorm);
- ``fit``'s defaults for ``--target dp`` and ``--target eo``;
- the random-group control: the defaults with the training rows' groups shuffled;
- single settings of a small grid (alpha, layers, learning rate, mixing target, extras);
- fairlearn's ExponentiatedGradient and ThresholdOptimizer on the same split, when
  fairlearn is installed (the ``bench`` extra).

Writes a Markdown table (mean ± std over seeds), the AP-vs-gap Pareto front as JSON, and
a PNG plot when matplotlib is installed.

    python benchmarks/efficacy.py                # default grid, 3 seeds (< 20 min, 2 cores)
    python benchmarks/efficacy.py --quick        # fewer settings (< 3 min)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmn_debias.finetune import Setting, Tensors, evaluate, evaluate_at_rate
from gmn_debias.fit import (
    FitConfig,
    build_final_model,
    default_layers,
    load_inputs,
    settings_grid,
    subset,
    to_tensors,
    training_threads,
)
from gmn_debias.predict import predict_scores
from gmn_debias.select import search
from gmn_debias.split import stratified_split

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
KEYS = {
    "DP": "demographic_parity_difference",
    "EO": "equal_opportunity_difference",
    "EOD": "equalized_odds_difference",
    "soft DP": "mean_score_difference",
    "AP": "average_precision",
    "acc": "accuracy",
    "sel. rate": "selection_rate",
    "DP @ input rate": "dp_at_input_rate",
}


def split(full: Tensors, seed: int, fraction: float = 0.3) -> tuple[Tensors, Tensors]:
    """The same stratified split ``fit`` makes for this seed."""
    strata = np.char.add(np.char.add(full.groups.astype(str), "|"), full.y.numpy().astype(str))
    train_idx, val_idx = stratified_split(strata, fraction, seed)
    return subset(full, train_idx), subset(full, val_idx)


def shuffled_groups(data: Tensors, seed: int) -> Tensors:
    """Random-group control: the same group sizes, assigned to random rows."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(10_000 + seed))
    return Tensors(data.x, data.y, data.group_ids[perm], data.groups[perm.numpy()], data.weights)


def run_method(
    base: torch.nn.Module, settings: list[Setting], train: Tensors, val: Tensors, held: Tensors,
    *, target: str, seed: int, max_ap_drop: float, input_rate: float,
) -> dict[str, Any]:
    """Search + select on validation (as ``fit``), then audit the chosen model on the holdout.

    ``input_rate`` is the input model's holdout selection rate (for the levelling-down column).
    """
    found = search(base, settings, train, val, target=target, max_ap_drop=max_ap_drop, seed=seed,
                   device=torch.device("cpu"))
    model, _ = build_final_model(base, settings, found.best, val.x, None)
    metrics = dict(evaluate(model, held, None)["metrics"])
    matched = evaluate_at_rate(model, held, input_rate, None)["metrics"]
    metrics["dp_at_input_rate"] = matched["demographic_parity_difference"]
    chosen = None if found.best is None else f"{settings[found.best[0]].describe()} @ epoch {found.best[1].epoch}"
    return {"metrics": metrics, "chosen": chosen, "status": found.selector.status}


def fairlearn_anchors(base: torch.nn.Module, full: Tensors, held: Tensors, seed: int) -> dict[str, dict]:
    """ExponentiatedGradient (no attribute at prediction) and ThresholdOptimizer (needs it).

    Both see the whole fine-tuning set (the rows ``fit`` splits into train and validation)
    and output hard predictions, so their AP is that of 0/1 scores (not comparable with
    the score-based AP of the other rows); DP, EO, EOD and accuracy are comparable.
    """
    try:
        from fairlearn.postprocessing import ThresholdOptimizer
        from fairlearn.reductions import (
            DemographicParity,
            ExponentiatedGradient,
            TruePositiveRateParity,
        )
        from sklearn.base import BaseEstimator, ClassifierMixin
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return {}
    from gmn_debias.metrics import audit_arrays

    x_fit, y_fit, g_fit = full.x.numpy(), full.y.numpy(), full.groups
    x_held, y_held = held.x.numpy(), held.y.numpy()
    out: dict[str, dict] = {}
    import warnings

    warnings.filterwarnings("ignore", module="fairlearn")
    for name, constraint in (("fairlearn ExponentiatedGradient (DP)", DemographicParity()),
                             ("fairlearn ExponentiatedGradient (TPR)", TruePositiveRateParity())):
        eg = ExponentiatedGradient(LogisticRegression(max_iter=2000), constraints=constraint)
        eg.fit(x_fit, y_fit, sensitive_features=g_fit)
        pred = eg.predict(x_held, random_state=seed).astype(float)
        out[name] = {"metrics": audit_arrays(y_held, pred, held.groups, score_type="label")["metrics"],
                     "chosen": "logistic regression; needs no attribute at prediction"}

    class Scorer(ClassifierMixin, BaseEstimator):  # ThresholdOptimizer post-processes the model's scores
        fitted_ = True  # prefit: sklearn's check_is_fitted looks for a trailing-underscore attribute

        def fit(self, x, y):  # noqa: ANN001 - sklearn protocol
            return self

        def predict(self, x):  # noqa: ANN001
            return predict_scores(base, torch.as_tensor(np.asarray(x), dtype=torch.float32))

    for name, constraint in (("fairlearn ThresholdOptimizer (DP)", "demographic_parity"),
                             ("fairlearn ThresholdOptimizer (TPR)", "true_positive_rate_parity")):
        to = ThresholdOptimizer(estimator=Scorer(), constraints=constraint, prefit=True, predict_method="predict")
        to.fit(x_fit, y_fit, sensitive_features=g_fit)
        pred = to.predict(x_held, sensitive_features=held.groups, random_state=seed)
        out[name] = {"metrics": audit_arrays(y_held, pred.astype(float), held.groups, score_type="label")["metrics"],
                     "chosen": "NEEDS the protected attribute at prediction"}
    return out


def grid(layers_all: tuple[str, ...], quick: bool) -> dict[str, tuple[str, list[Setting]]]:
    """Single settings that chart the trade-off (each still gets fit's epoch selection)."""
    first = layers_all[:1]
    entries: dict[str, tuple[str, list[Setting]]] = {}
    if not quick:
        for a in (0.1, 0.5, 2.0):
            for name, layers in (("first layer", first), ("all hidden", layers_all)):
                entries[f"GMN α={a:g} {name}, identity, lr 1e-3"] = ("dp", [Setting(layers, alpha=a, lr=1e-3, epochs=10)])
    running = dict(alpha=0.5, epochs=8, inference="running")
    entries["GMN alone: running, lr 1e-4 (no penalty)"] = ("dp", [Setting(layers_all, lr=1e-4, **running)])
    entries["GMN running statistics only (lr 0)"] = ("dp", [Setting(layers_all, lr=0.0, alpha=0.5, epochs=1, inference="running")])
    entries["GMN + gap penalty 80"] = ("dp", [Setting(layers_all, lr=1e-4, gap_penalty=80.0, **running)])
    entries["GMN dp-mix, lr 3e-4 (target eo)"] = ("eo", [Setting(layers_all, lr=3e-4, **running)])
    entries["GMN eo-mix, lr 3e-4 (target eo)"] = ("eo", [Setting(layers_all, lr=3e-4, mix_target="eo", **running)])
    return entries


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "undefined"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, no fairlearn anchors, a smaller grid (< 3 min)")
    parser.add_argument("--max-ap-drop", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--no-grid", action="store_true", help="only the headline methods")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    started = time.perf_counter()

    cfg = FitConfig(model=SAMPLES / "adult_mlp.safetensors", data=SAMPLES / "adult_finetune.csv",
                    protected=["sex"], eval=SAMPLES / "adult_holdout.csv")
    loaded, _, data, _, held_data = load_inputs(cfg)
    names = sorted(set(map(str, data.groups)))
    full, held = to_tensors(data, names), to_tensors(held_data, names)
    base = loaded.model.float().eval()
    layers_all = tuple(default_layers(base, full.x[:2]))
    defaults = {t: settings_grid(replace(cfg, target=t).resolved(), list(layers_all)) for t in ("dp", "eo")}
    # Controls with the same budget: the same grid without GroupMixNorm (what the gap penalty
    # does alone), and plain fine-tuning (no GroupMixNorm, no penalty).
    no_gmn = {t: [replace(s, layers=()) for s in defaults[t] if s.lr > 0] for t in defaults}
    plain = {t: list(dict.fromkeys(replace(s, gap_penalty=0.0) for s in no_gmn[t])) for t in defaults}

    base_metrics = dict(evaluate(base, held, None)["metrics"])
    input_rate = base_metrics["selection_rate"]

    def method(settings: list[Setting], target: str, shuffle: bool = False) -> Callable[[Tensors, Tensors, int], dict]:
        def run(train: Tensors, val: Tensors, seed: int) -> dict:
            train = shuffled_groups(train, seed) if shuffle else train
            return run_method(base, settings, train, val, held, target=target, seed=seed,
                              max_ap_drop=args.max_ap_drop, input_rate=input_rate)
        return run

    methods: dict[str, tuple[str, Callable[[Tensors, Tensors, int], dict]]] = {}
    for t in ("dp", "eo"):
        methods[f"fit defaults --target {t}"] = (t, method(defaults[t], t))
        if no_gmn[t] != plain[t]:
            methods[f"same grid without GroupMixNorm (gap penalty alone), target {t}"] = (t, method(no_gmn[t], t))
        methods[f"plain fine-tuning, same budget, target {t}"] = (t, method(plain[t], t))
        methods[f"random-group control, target {t}"] = (t, method(defaults[t], t, shuffle=True))
    if not args.no_grid:
        for label, (t, settings) in grid(layers_all, args.quick).items():
            methods[label] = (t, method(settings, t))

    base_metrics["dp_at_input_rate"] = base_metrics["demographic_parity_difference"]
    rows: dict[str, list[dict]] = {"input model": [{"metrics": base_metrics, "chosen": ""}]}
    torch.set_num_threads(training_threads(None, base, torch.device("cpu")))  # the threads fit uses
    for seed in seeds:
        train, val = split(full, seed)
        for label, (_, fn) in methods.items():
            rows.setdefault(label, []).append(fn(train, val, seed))
        if not args.quick:
            for label, res in fairlearn_anchors(base, full, held, seed).items():
                rows.setdefault(label, []).append(res)
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)

    header = "| method | " + " | ".join(KEYS) + " | kept original |"
    lines = [header, "|" + "---|" * (len(KEYS) + 2)]
    front = []
    for label, results in rows.items():
        cells = [fmt([r["metrics"].get(k) for r in results]) for k in KEYS.values()]
        kept = sum(r.get("status") == "kept_original" for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {kept}/{len(results)} |")
        front.append({"method": label, **{k: float(np.mean([r["metrics"][v] for r in results if r["metrics"].get(v) is not None] or [np.nan])) for k, v in KEYS.items()},
                      "chosen": [r.get("chosen") for r in results]})
    table = "\n".join(lines)
    elapsed = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "efficacy.md").write_text(
        f"Adult holdout ({len(held)} rows), protected attribute sex, seeds {seeds}, AP budget {args.max_ap_drop}; "
        f"mean ± std over seeds; ran in {elapsed:.0f} s.\n\n{table}\n")
    pareto = [p for p in front if not any(q["AP"] >= p["AP"] and q["DP"] <= p["DP"] and q is not p and (q["AP"] > p["AP"] or q["DP"] < p["DP"]) for q in front)]
    (args.out / "efficacy.json").write_text(json.dumps({"points": front, "pareto_front_ap_vs_dp": [p["method"] for p in pareto]}, indent=2))
    print(table)
    print(f"\nwrote {args.out / 'efficacy.md'} and efficacy.json in {elapsed:.0f} s")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in front:
        ax.scatter(p["DP"], p["AP"])
        ax.annotate(p["method"][:40], (p["DP"], p["AP"]), fontsize=6)
    ax.set_xlabel("demographic parity difference (holdout)")
    ax.set_ylabel("average precision (holdout)")
    fig.tight_layout()
    fig.savefig(args.out / "efficacy.png", dpi=120)


if __name__ == "__main__":
    main()
