"""Forward+backward time of GroupMixNorm relative to torch.nn.BatchNorm1d.

Both run on the same (4096, 256) float32 input in the same process, interleaved, and
the ratio of medians is printed per number of groups K. Goal: <= 1.5x at K=2 and <= 2x
at K=64 on CPU.

    python benchmarks/bench_layer.py [--repeats 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gmn_debias.layer import GroupMixNorm

N, C = 4096, 256


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, groups: torch.Tensor | None) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        y = layer(x) if groups is None else layer(x, groups)
        y.backward(grad)
    return run


def _median_times(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per step; steps are interleaved so machine noise hits all alike."""
    for run in steps.values():
        for _ in range(5):
            run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(N, C).mul_(2).add_(1).requires_grad_(True)
    grad = torch.randn(N, C)
    steps = {"BatchNorm1d": _step(nn.BatchNorm1d(C).train(), x, grad, None)}
    for k in (2, 16, 64):
        groups = torch.randint(0, k, (N,), generator=torch.Generator().manual_seed(k))
        for inference in ("identity", "running"):
            layer = GroupMixNorm(C, inference=inference, generator=torch.Generator().manual_seed(0)).train()
            steps[f"GMN K={k} {inference}"] = _step(layer, x, grad, groups)
    medians = _median_times(steps, args.repeats)
    base = medians["BatchNorm1d"]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"input ({N}, {C}) float32, forward+backward, {args.threads} threads, median of {args.repeats}; "
          f"load average {load} (other processes inflate every time, the ratios less)")
    print(f"{'layer':<26}{'ms':>8}{'x BatchNorm1d':>15}")
    for name, sec in medians.items():
        print(f"{name:<26}{sec * 1e3:>8.3f}{sec / base:>15.2f}")


if __name__ == "__main__":
    main()
