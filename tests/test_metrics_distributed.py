"""FairnessAccumulator.sync across two torch.distributed (gloo) ranks equals one pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from gmn_debias.metrics import FairnessAccumulator, audit_arrays


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.integers(0, 2, 400), rng.random(400), rng.choice(["a", "b", "c"], 400)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        y, s, g = _data()
        acc = FairnessAccumulator()
        part = slice(rank * 200, (rank + 1) * 200)
        mask = g[part] != ("c" if rank == 0 else "zz")  # rank 0 never sees group c
        acc.update(y[part][mask], s[part][mask], g[part][mask])
        if rank == 1:
            extra = slice(0, 200)
            c_rows = g[extra] == "c"
            acc.update(y[extra][c_rows], s[extra][c_rows], g[extra][c_rows])
        acc.sync()
        Path(out_dir, f"{rank}.json").write_text(json.dumps(acc.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_sync_over_two_ranks_equals_a_single_pass(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    y, s, g = _data()
    expected = json.loads(json.dumps(audit_arrays(y, s, g)))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == expected  # exact: the sums are exact and the scores are re-sorted
