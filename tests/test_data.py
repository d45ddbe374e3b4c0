"""Reading labelled files: labels, groups, weights, widths, chunks, and the sample files."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gmn_debias.data import MISSING_GROUP, concat, iter_labelled, load_labelled
from gmn_debias.errors import UserError
from gmn_debias.schema import FeatureSchema


def write(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


def labels_of(tmp_path: Path, values: list[str], **options) -> list[int]:
    body = "".join(f"{i},{v},g\n" for i, v in enumerate(values))
    path = write(tmp_path, "x,y,grp\n" + body)
    return load_labelled(path, label="y", protected=["grp"], **options).y.tolist()


# ------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["0", "1", "1", "0"], [0, 1, 1, 0]),
        (["-1", "1", "1", "-1"], [0, 1, 1, 0]),
        (["True", "False", "true", "FALSE"], [1, 0, 1, 0]),
        (["1.0", "0.0", "1", "0"], [1, 0, 1, 0]),  # spellings of one number are one value
        (["0", "1", "2", "1"], None),
        ([" 1", "0 ", "1", "0"], [1, 0, 1, 0]),
    ],
)
def test_implicit_label_encodings(tmp_path: Path, values: list[str], expected) -> None:
    if expected is None:
        with pytest.raises(UserError, match=r"3 distinct values \('0', '1', '2'\)"):
            labels_of(tmp_path, values)
    else:
        assert labels_of(tmp_path, values) == expected


def test_text_labels_need_positive(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"label column 'y' holds text values \('<=50K', '>50K'\); name the positive"):
        labels_of(tmp_path, [">50K", "<=50K"])
    assert labels_of(tmp_path, [">50K", "<=50K", ">50K"], positive=">50K") == [1, 0, 1]


def test_adult_test_labels_with_a_period(tmp_path: Path) -> None:
    values = [">50K", "<=50K.", ">50K.", "<=50K"]
    with pytest.raises(UserError) as info:
        labels_of(tmp_path, values, positive=">50K")
    message = str(info.value)
    assert "4 distinct values ('<=50K', '<=50K.', '>50K', '>50K.')" in message and "--normalize-labels" in message
    assert labels_of(tmp_path, values, positive=">50K", normalize_labels=True) == [1, 0, 1, 0]
    assert labels_of(tmp_path, values, positive=">50K.", normalize_labels=True) == [1, 0, 1, 0]


def test_positive_must_be_a_label_value(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"positive class 'yes' is not one of its values \('0', '1'\)"):
        labels_of(tmp_path, ["0", "1"], positive="yes")


def test_numeric_labels_outside_known_encodings(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="0/1, -1/1 or True/False"):
        labels_of(tmp_path, ["0", "2"])


def test_empty_label_cell_names_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "x,y,grp\n1,1,a\n2,,a\n3,0,b\n")
    with pytest.raises(UserError, match=r"d.csv: label column 'y' has empty cells at rows 2$"):
        load_labelled(path, label="y", protected=["grp"])


# ------------------------------------------------------------------------- groups
def test_group_labels_stay_text(tmp_path: Path) -> None:
    path = write(tmp_path, "x,y,grp\n1,1,NA\n2,0,1\n3,1,1.0\n4,0, null \n5,1,None\n6,0,nan\n")
    data = load_labelled(path, label="y", protected=["grp"])
    assert data.groups.tolist() == ["NA", "1", "1.0", "null", "None", "nan"]


def test_empty_group_cells(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "x,y,sex\n1,1,F\n2,0,\n3,1,M\n4,0,  \n")
    with pytest.raises(UserError, match=r"d.csv: protected column 'sex' has 2 empty cell\(s\) at rows 2, 4; .*--missing-groups"):
        load_labelled(path, label="y", protected=["sex"])
    with caplog.at_level(logging.WARNING, logger="gmn_debias"):
        dropped = load_labelled(path, label="y", protected=["sex"], missing_groups="drop")
    assert dropped.groups.tolist() == ["F", "M"] and dropped.rows.tolist() == [1, 3]
    assert dropped.y.tolist() == [1, 1] and dropped.x[:, 0].tolist() == [1.0, 3.0] and dropped.n_dropped == 2
    assert any("dropped 2 row(s)" in r.getMessage() for r in caplog.records)
    kept = load_labelled(path, label="y", protected=["sex"], missing_groups="group")
    assert kept.groups.tolist() == ["F", MISSING_GROUP, "M", MISSING_GROUP]


def test_intersectional_groups(tmp_path: Path) -> None:
    path = write(tmp_path, "x,y,sex,race\n1,1,F,White\n2,0,M,Black\n3,1,F,Black\n")
    data = load_labelled(path, label="y", protected=["sex", "race"])
    assert data.groups.tolist() == ["F|White", "M|Black", "F|Black"]
    assert data.x.shape == (3, 1)  # protected columns never feed the model


# ------------------------------------------------------------------------ weights
def test_weights(tmp_path: Path) -> None:
    path = write(tmp_path, "x,y,g,w\n1,1,a,0.5\n2,0,b,2\n")
    data = load_labelled(path, label="y", protected=["g"], weight="w")
    assert data.weights.dtype == torch.float64 and data.weights.tolist() == [0.5, 2.0]
    assert data.x.shape == (2, 1)


@pytest.mark.parametrize(("cell", "match"), [("-1", "negative values at rows 2"), ("", "non-numeric or empty")])
def test_bad_weights(tmp_path: Path, cell: str, match: str) -> None:
    path = write(tmp_path, f"x,y,g,w\n1,1,a,1\n2,0,b,{cell}\n")
    with pytest.raises(UserError, match=match):
        load_labelled(path, label="y", protected=["g"], weight="w")


# ----------------------------------------------------------------- feature widths
def test_without_schema_the_width_must_match(tmp_path: Path) -> None:
    path = write(tmp_path, "a,b,c,y,g\n1,2,3,1,x\n")
    with pytest.raises(UserError, match="3 feature columns but the model takes 4 inputs"):
        load_labelled(path, label="y", protected=["g"], model=nn.Linear(4, 1))
    assert load_labelled(path, label="y", protected=["g"], input_width=3).x.tolist() == [[1.0, 2.0, 3.0]]


def test_without_schema_features_must_be_numeric(tmp_path: Path) -> None:
    path = write(tmp_path, "a,b,y,g\n1,red,1,x\n2,blue,0,x\n")
    with pytest.raises(UserError, match=r"column 'b' must be numeric.*'red'.*rows 1, 2"):
        load_labelled(path, label="y", protected=["g"], input_width=2)


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"a": ["1", "2"], "b": ["red", "blue"], "y": ["1", "0"]})


def test_schema_width_must_match_the_model(tmp_path: Path) -> None:
    schema = FeatureSchema.fit(_frame(), numeric=["a"], categorical=["b"], label="y")
    path = write(tmp_path, "a,b,y,g\n1,red,1,x\n")
    with pytest.raises(UserError, match="schema encodes 3 inputs but the model takes 5"):
        load_labelled(path, schema=schema, protected=["g"], input_width=5)


def test_schema_supplies_label_positive_and_encoding(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = FeatureSchema.fit(_frame(), numeric=["a"], categorical=["b"], label="y", positive="1")
    path = write(tmp_path, "g,b,a,y,unused\nx,red,1,1,zzz\nx,teal,2,0,zzz\n")
    with caplog.at_level(logging.WARNING, logger="gmn_debias"):
        data = load_labelled(path, schema=schema, protected=["g"], model=nn.Linear(3, 1))
    assert data.y.tolist() == [1, 0]
    assert torch.equal(data.x, schema.transform(_frame().assign(b=["red", "teal"])))
    assert sum("d.csv" in r.getMessage() and "'teal'" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(UserError, match="'teal'"):
        load_labelled(path, schema=schema, protected=["g"], strict=True)


def test_schema_from_a_yaml_path(tmp_path: Path) -> None:
    schema = FeatureSchema.fit(_frame(), numeric=["a"], categorical=["b"], label="y", positive="1")
    schema.to_yaml(tmp_path / "s.yaml")
    path = write(tmp_path, "a,b,y,g\n1,red,1,x\n")
    assert torch.equal(
        load_labelled(path, schema=tmp_path / "s.yaml", protected=["g"]).x,
        load_labelled(path, schema=schema, protected=["g"]).x,
    )


def test_missing_columns_are_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "x,income,sex\n1,1,F\n")
    with pytest.raises(UserError, match=r"d.csv: no column 'Sex' \(did you mean 'sex'\?\)"):
        load_labelled(path, label="income", protected=["Sex"])
    with pytest.raises(UserError, match="no label column given"):
        load_labelled(path, protected=["sex"])
    with pytest.raises(UserError, match="does not exist"):
        load_labelled(tmp_path / "absent.csv", label="income")


def test_header_only_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no usable data rows"):
        load_labelled(write(tmp_path, "x,y,g\n"), label="y", protected=["g"])


def test_parquet_matches_csv(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    csv_path = write(tmp_path, "x,y,g\n1.5,1,NA\n2,0,b\n")
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    frame.to_parquet(tmp_path / "d.parquet")
    a = load_labelled(csv_path, label="y", protected=["g"])
    b = load_labelled(tmp_path / "d.parquet", label="y", protected=["g"])
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.groups.tolist() == b.groups.tolist()


# --------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunksize", [1, 3, 7, 1000])
def test_chunks_equal_the_whole_file(tmp_path: Path, chunksize: int) -> None:
    rng = np.random.default_rng(chunksize)
    rows = [f"{rng.normal():.4f},{rng.integers(2)},{rng.choice(['a', 'b', 'NA', ''])},{rng.uniform():.3f}" for _ in range(23)]
    path = write(tmp_path, "x,y,g,w\n" + "\n".join(rows) + "\n")
    options = dict(label="y", protected=["g"], weight="w", missing_groups="drop")
    whole = load_labelled(path, **options)
    parts = list(iter_labelled(path, chunksize=chunksize, **options))
    joined = concat(parts)
    assert len(parts) == -(-23 // chunksize)
    assert torch.equal(joined.x, whole.x) and torch.equal(joined.y, whole.y) and torch.equal(joined.weights, whole.weights)
    assert joined.groups.tolist() == whole.groups.tolist() and joined.rows.tolist() == whole.rows.tolist()
    assert joined.n_dropped == whole.n_dropped == sum(r.split(",")[2] == "" for r in rows)


def test_label_values_are_checked_across_chunks(tmp_path: Path) -> None:
    path = write(tmp_path, "x,y,g\n1,a,g\n2,b,g\n3,a,g\n4,c,g\n")
    chunks = iter_labelled(path, label="y", positive="a", protected=["g"], chunksize=2)
    next(chunks)
    with pytest.raises(UserError, match=r"3 distinct values \('a', 'b', 'c'\)"):
        next(chunks)


def test_unseen_warning_once_with_total_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = FeatureSchema.fit(_frame(), numeric=["a"], categorical=["b"], label="y")
    path = write(tmp_path, "a,b,y,g\n" + "".join(f"{i},{'teal' if i % 2 else 'red'},1,x\n" for i in range(10)))
    with caplog.at_level(logging.WARNING, logger="gmn_debias"):
        list(iter_labelled(path, schema=schema, protected=["g"], chunksize=3))
    [record] = [r for r in caplog.records if "teal" in r.getMessage()]
    assert " 5 row(s)" in record.getMessage()


# --------------------------------------------------------------------- sample files
def _clean_rows(path: Path, skip_first: bool) -> list[list[str]]:
    """The raw Adult rows without '?' cells, labels without the period (independent of the script)."""
    with open(path, newline="") as fh:
        lines = fh.read().splitlines()[1 if skip_first else 0 :]
    rows = [[cell.strip() for cell in line.split(",")] for line in lines if line.strip()]
    return [r[:-1] + [r[-1].rstrip(".")] for r in rows if "?" not in r]


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))[1:]


def test_holdout_is_the_cleaned_test_split(adult_dir: Path, holdout_csv: Path) -> None:
    expected = _clean_rows(adult_dir / "adult.test", skip_first=True)
    assert len(expected) == 15_060
    assert _csv_rows(holdout_csv) == expected


def test_finetune_rows_come_from_the_train_split(adult_dir: Path, finetune_csv: Path) -> None:
    train = _clean_rows(adult_dir / "adult.data", skip_first=False)
    rows = _csv_rows(finetune_csv)
    assert len(train) == 30_162 and len(rows) == 5_000
    pool: dict[tuple[str, ...], int] = {}
    for r in train:
        pool[tuple(r)] = pool.get(tuple(r), 0) + 1
    for r in rows:  # a sub-multiset of the train rows
        assert pool.get(tuple(r), 0) > 0
        pool[tuple(r)] -= 1


def test_sample_model_scores_the_holdout_and_is_biased(sample_model: Path, holdout_csv: Path) -> None:
    """The committed model is what the README promises: accurate, and unfair by sex (fairlearn)."""
    from fairlearn.metrics import demographic_parity_difference
    from sklearn.metrics import average_precision_score

    from gmn_debias.checkpoint import load_model

    loaded = load_model(sample_model)
    data = load_labelled(holdout_csv, schema=loaded.schema, model=loaded.model, protected=["sex"])
    with open(holdout_csv, newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert data.y.tolist() == [int(r["income"] == ">50K") for r in raw]
    assert data.groups.tolist() == [r["sex"] for r in raw]
    with torch.no_grad():
        score = torch.sigmoid(loaded.model(data.x)).squeeze(1).numpy()
    dp = demographic_parity_difference(data.y.numpy(), score >= 0.5, sensitive_features=data.groups)
    assert 0.15 <= dp <= 0.25
    assert average_precision_score(data.y.numpy(), score) > 0.7


def test_make_sample_models_reproduces_the_committed_files(adult_dir: Path, tmp_path: Path) -> None:
    """The script is deterministic and the committed files are its output (about 15 s)."""
    import subprocess
    import sys

    from conftest import REPO, SAMPLE_DIR
    from safetensors import safe_open

    script = REPO / "scripts" / "make_sample_models.py"
    run = subprocess.run(
        [sys.executable, str(script), "--adult-dir", str(adult_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "holdout demographic_parity_difference" in run.stdout
    for name in ("adult_finetune.csv", "adult_holdout.csv", "adult_schema.yaml"):
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
    with safe_open(str(tmp_path / "adult_mlp.safetensors"), "pt") as new, safe_open(
        str(SAMPLE_DIR / "adult_mlp.safetensors"), "pt"
    ) as old:
        assert new.metadata() == old.metadata() and set(new.keys()) == set(old.keys())
        for key in old.keys():  # bit-identical on one machine; other CPUs may round differently
            torch.testing.assert_close(new.get_tensor(key), old.get_tensor(key), rtol=0, atol=1e-3)


# ------------------------------------------------ the same errors through the CLI
CLI_CASES = [
    ("y,g,s\n>50K,F,0.9\n<=50K.,M,0.2\n>50K.,F,0.7\n", ["--positive", ">50K"], ["3 distinct values", "--normalize-labels"]),
    ("y,g,s\nyes,F,0.9\nno,M,0.2\n", [], ["holds text values ('no', 'yes')", "--positive"]),
    ("y,g,s\n1,F,0.9\n0,,0.2\n1,M,0.4\n", [], ["protected column 'g'", "rows 2", "--missing-groups"]),
    ("y,G,s\n1,F,0.9\n0,M,0.2\n", [], ["no column 'g'", "did you mean 'G'"]),
    ("y,g,s,w\n1,F,0.9,1\n0,M,0.2,-3\n", ["--weight", "w"], ["weight column 'w'", "negative values at rows 2"]),
]


@pytest.mark.parametrize(("text", "options", "fragments"), CLI_CASES)
def test_bad_data_through_the_cli(tmp_path: Path, text: str, options: list[str], fragments: list[str]) -> None:
    from conftest import assert_one_line_error, invoke

    path = write(tmp_path, text)
    result = invoke(["audit", "--scores", path, "--score-col", "s", "--protected", "g", "--label", "y", *options])
    assert_one_line_error(result, str(path), *fragments)


def test_width_mismatch_through_the_cli(tmp_path: Path) -> None:
    from conftest import assert_one_line_error, invoke

    from gmn_debias.archs import MLP
    from gmn_debias.checkpoint import save_model

    model = tmp_path / "m.safetensors"
    save_model(MLP(4), model, arch={"name": "mlp", "kwargs": {"in_dim": 4}}, schema=None, provenance={})
    data = write(tmp_path, "a,b,c,y,g\n1,2,3,1,F\n4,5,6,0,M\n")
    result = invoke(["audit", model, data, "--protected", "g", "--label", "y"])
    assert_one_line_error(result, "3 feature columns but the model takes 4 inputs")
