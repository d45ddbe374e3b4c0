"""Cost of GroupMixNorm during fine-tuning, and the wall time of the sample ``fit``.

Prints (1) one fine-tuning epoch of the sample model with GroupMixNorm at fit's default
layers versus the same epoch without it (same model, data, batch size, seed), as a ratio
of medians measured in this run, and (2) the wall time of the README's sample ``fit``
command run as a subprocess (import, load, search, fold, save, report).

    python benchmarks/bench_fit.py [--repeats 7] [--skip-command]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gmn_debias.finetune import Setting, finetune  # noqa: E402
from gmn_debias.fit import (  # noqa: E402
    FitConfig,
    default_layers,
    load_inputs,
    subset,
    to_tensors,
    training_threads,
)

MODEL = ROOT / "sample_models" / "adult_mlp.safetensors"
DATA = ROOT / "sample_models" / "adult_finetune.csv"
HOLDOUT = ROOT / "sample_models" / "adult_holdout.csv"


def time_epoch(base: torch.nn.Module, setting: Setting, train, val, repeats: int) -> list[float]:
    """Seconds for one epoch (training + the per-epoch validation audit on a tiny set)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        finetune(base, setting, 0, train, val, seed=0, device=torch.device("cpu"))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-command", action="store_true", help="only the per-epoch ratio")
    args = parser.parse_args()

    cfg = FitConfig(model=MODEL, data=DATA, protected=["sex"])
    loaded, _, data, _, _ = load_inputs(cfg)
    names = sorted(set(map(str, data.groups)))
    full = to_tensors(data, names)
    base = loaded.model.float().eval()
    layers = tuple(default_layers(base, full.x[:2]))
    # A tiny validation set keeps the per-epoch audit from diluting the training cost.
    val_idx = np.concatenate([np.flatnonzero(full.groups == g)[:8] for g in names])
    val = subset(full, val_idx)
    with_gmn = Setting(layers, epochs=1)
    plain = Setting((), epochs=1)
    torch.set_num_threads(training_threads(None, base, torch.device("cpu")))  # fit's policy
    time_epoch(base, with_gmn, full, val, 1)  # warm-up
    t_gmn, t_plain = [], []
    for _ in range(args.repeats):  # interleave so drift hits both alike
        t_gmn += time_epoch(base, with_gmn, full, val, 1)
        t_plain += time_epoch(base, plain, full, val, 1)
    m_gmn, m_plain = statistics.median(t_gmn), statistics.median(t_plain)
    print(f"one fine-tune epoch, {len(full)} rows, batch 256, layers {','.join(layers)}, "
          f"{torch.get_num_threads()} thread(s) as fit uses")
    print(f"  without GroupMixNorm: {m_plain * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"  with GroupMixNorm:    {m_gmn * 1e3:8.1f} ms")
    print(f"  ratio: {m_gmn / m_plain:.2f}x  (goal <= 1.2x)")

    if args.skip_command:
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gmn_debias", "fit", str(MODEL), str(DATA), "--protected", "sex",
               "--eval", str(HOLDOUT), "--out", str(Path(tmp) / "out"), "--quiet"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    print(f"sample `gmn-debias fit` (defaults) wall time: {wall:.1f} s (goal <= 30 s)")


if __name__ == "__main__":
    main()
