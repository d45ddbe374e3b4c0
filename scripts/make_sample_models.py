"""Build the committed Adult sample model and its two CSVs from the raw UCI Adult files.

The model is deliberately unmitigated: an MLP for ``income > 50K`` that never sees
``sex`` or ``race`` (nor ``fnlwgt``, a sampling weight) yet is biased through proxies such
as ``relationship`` and ``marital-status``, which is the situation GroupMixNorm is for.

    python scripts/make_sample_models.py --adult-dir ../shared/data/adult [--out sample_models]

Writes ``adult_mlp.safetensors`` (architecture + schema in its metadata),
``adult_schema.yaml`` (the same schema, for ``--schema``), ``adult_finetune.csv`` (5,000
cleaned train rows the model never trained on) and ``adult_holdout.csv`` (the cleaned
test split), then prints holdout metrics. Deterministic: fixed seed, one thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from gmn_debias.archs import MLP
from gmn_debias.checkpoint import save_model
from gmn_debias.files import atomic_path, sha256_file
from gmn_debias.schema import FeatureSchema

COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country", "income",
]  # fmt: skip
NUMERIC = ["age", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship", "native-country"]
LABEL, POSITIVE = "income", ">50K"
SEED = 0
N_FINETUNE = 5_000
HIDDEN = (64, 32)
EPOCHS = 25
BATCH = 256
LR = 1e-3


def read_adult(path: Path, *, skip_first_line: bool) -> pd.DataFrame:
    """Raw Adult split → text frame without missing values ('?') and with clean labels."""
    frame = pd.read_csv(
        path, header=None, names=COLUMNS, dtype=str, keep_default_na=False, skipinitialspace=True,
        skiprows=1 if skip_first_line else 0,
    )  # fmt: skip
    frame = frame.apply(lambda col: col.str.strip())
    frame = frame[(frame != "?").all(axis=1) & (frame[LABEL] != "")]
    frame[LABEL] = frame[LABEL].str.rstrip(".")
    return frame.reset_index(drop=True)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Plain full-precision Adam on BCE; no fairness constraint of any kind."""
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            optimiser.zero_grad()
            loss_fn(model(x[idx]).squeeze(1), y[idx]).backward()
            optimiser.step()
    model.eval()


def report(y: np.ndarray, score: np.ndarray, sex: np.ndarray) -> dict[str, float]:
    """Holdout numbers from fairlearn/scikit-learn (independent of this package's metrics)."""
    from fairlearn.metrics import (
        demographic_parity_difference,
        equalized_odds_difference,
    )
    from sklearn.metrics import accuracy_score, average_precision_score

    pred = (score >= 0.5).astype(int)
    return {
        "demographic_parity_difference": float(demographic_parity_difference(y, pred, sensitive_features=sex)),
        "equalized_odds_difference": float(equalized_odds_difference(y, pred, sensitive_features=sex)),
        "average_precision": float(average_precision_score(y, score)),
        "accuracy": float(accuracy_score(y, pred)),
    }


def write_csv(frame: pd.DataFrame, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adult-dir", type=Path, required=True, help="folder with adult.data and adult.test")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "sample_models")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # the same float sums in the same order on every machine
    torch.use_deterministic_algorithms(True)

    data_file, test_file = args.adult_dir / "adult.data", args.adult_dir / "adult.test"
    full = read_adult(data_file, skip_first_line=False)
    holdout = read_adult(test_file, skip_first_line=True)
    order = np.random.default_rng(SEED).permutation(len(full))
    finetune, train_rows = full.iloc[np.sort(order[:N_FINETUNE])], full.iloc[np.sort(order[N_FINETUNE:])]

    schema = FeatureSchema.fit(train_rows, numeric=NUMERIC, categorical=CATEGORICAL, label=LABEL, positive=POSITIVE)
    x = schema.transform(train_rows)
    y = torch.tensor((train_rows[LABEL] == POSITIVE).to_numpy(), dtype=torch.float32)
    arch = {"name": "mlp", "kwargs": {"in_dim": schema.width, "hidden": list(HIDDEN)}}
    model = MLP(schema.width, hidden=HIDDEN)
    train(model, x, y)

    args.out.mkdir(parents=True, exist_ok=True)
    provenance = {
        "script": "scripts/make_sample_models.py",
        "data_sha256": {"adult.data": sha256_file(data_file), "adult.test": sha256_file(test_file)},
        "seed": SEED,
        "training": {"rows": len(train_rows), "epochs": EPOCHS, "batch": BATCH, "lr": LR, "optimiser": "Adam"},
        "excluded_inputs": ["sex", "race", "fnlwgt"],
    }
    save_model(
        model, args.out / "adult_mlp.safetensors", arch=arch, schema=schema, provenance=provenance,
        check_input=schema.transform(holdout.head(64)),
    )  # fmt: skip
    schema.to_yaml(args.out / "adult_schema.yaml")
    write_csv(finetune, args.out / "adult_finetune.csv")
    write_csv(holdout, args.out / "adult_holdout.csv")

    with torch.no_grad():
        score = torch.sigmoid(model(schema.transform(holdout)).squeeze(1)).numpy()
    y_holdout = (holdout[LABEL] == POSITIVE).to_numpy().astype(int)
    print(f"train {len(train_rows)} rows, finetune {len(finetune)}, holdout {len(holdout)}; input width {schema.width}")
    for name, value in report(y_holdout, score, holdout["sex"].to_numpy()).items():
        print(f"holdout {name}: {value:.4f}")


if __name__ == "__main__":
    main()
