"""The feature schema: fitted statistics, encoding, unseen categories, storage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmn_debias.errors import UserError
from gmn_debias.schema import CategoricalFeature, FeatureSchema, NumericFeature

FRAME = pd.DataFrame(
    {
        "age": ["20", "30", " 40", "50 "],
        "colour": ["red", "blue ", "red", "green"],
        "hours": ["1.5", "2.5", "3.5", "4.5"],
        "y": ["no", "yes", "no", "yes"],
    },
    index=[1, 2, 3, 4],
)


def fitted() -> FeatureSchema:
    return FeatureSchema.fit(FRAME, numeric=["age", "hours"], categorical=["colour"], label="y", positive="yes")


def test_fit_learns_population_mean_std_and_a_sorted_vocabulary() -> None:
    schema = fitted()
    ages = np.array([20.0, 30.0, 40.0, 50.0])
    assert schema.features[0] == NumericFeature("age", pytest.approx(ages.mean()), pytest.approx(ages.std(ddof=0)))
    assert schema.features[2] == CategoricalFeature("colour", ["blue", "green", "red"])
    assert schema.columns == ["age", "hours", "colour"]
    assert schema.feature_names == ["age", "hours", "colour=blue", "colour=green", "colour=red"]
    assert schema.width == 5
    assert (schema.label, schema.positive) == ("y", "yes")


def test_transform_standardizes_and_one_hot_encodes() -> None:
    schema = fitted()
    x = schema.transform(FRAME)
    assert x.dtype == torch.float32 and x.shape == (4, 5)
    ages = np.array([20.0, 30.0, 40.0, 50.0])
    np.testing.assert_allclose(x[:, 0].numpy(), (ages - ages.mean()) / ages.std(), rtol=1e-6)
    expected = pd.get_dummies(FRAME["colour"].str.strip()).astype(float)[["blue", "green", "red"]].to_numpy()
    np.testing.assert_array_equal(x[:, 2:].numpy(), expected)


def test_a_constant_column_gets_std_one() -> None:
    frame = pd.DataFrame({"c": ["3", "3", "3"]})
    schema = FeatureSchema.fit(frame, numeric=["c"])
    assert schema.features[0] == NumericFeature("c", 3.0, 1.0)
    assert torch.equal(schema.transform(frame), torch.zeros(3, 1))


def test_column_order_is_the_schema_not_the_file() -> None:
    schema = fitted()
    shuffled = FRAME[["y", "colour", "hours", "age"]]
    assert torch.equal(schema.transform(shuffled), schema.transform(FRAME))


def test_unseen_categories_are_zero_with_a_counted_warning(caplog: pytest.LogCaptureFixture) -> None:
    schema = fitted()
    new = pd.DataFrame({"age": ["20", "30", "40"], "hours": ["1", "2", "3"], "colour": ["purple", "red", "purple"]})
    with caplog.at_level(logging.WARNING, logger="gmn_debias"):
        x = schema.transform(new, source="new.csv")
    assert x[:, 2:].sum(dim=1).tolist() == [0.0, 1.0, 0.0]
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "'colour'" in record.getMessage() and " 2 row(s)" in record.getMessage() and "'purple'" in record.getMessage()


def test_unseen_categories_are_an_error_when_strict() -> None:
    new = pd.DataFrame({"age": ["1"] * 3, "hours": ["1"] * 3, "colour": ["red", "purple", "teal"]}, index=[1, 2, 3])
    with pytest.raises(UserError, match=r"new.csv: column 'colour' has 2 row\(s\).*'purple'.*rows 2, 3"):
        fitted().transform(new, strict=True, source="new.csv")


@pytest.mark.parametrize("cell", ["", "abc", "nan", "inf"])
def test_non_numeric_cell_names_column_and_row(cell: str) -> None:
    bad = FRAME.assign(hours=["1", cell, "2", "3"])
    with pytest.raises(UserError, match=r"d.csv: column 'hours' must be numeric.* at rows 2$"):
        fitted().transform(bad, source="d.csv")


def test_missing_column_is_named() -> None:
    with pytest.raises(UserError, match="'colour'"):
        fitted().transform(FRAME.drop(columns="colour"))


def test_dict_and_yaml_round_trips(tmp_path: Path) -> None:
    schema = fitted()
    assert FeatureSchema.from_dict(schema.to_dict()) == schema
    path = tmp_path / "schema.yaml"
    schema.to_yaml(path)
    again = FeatureSchema.from_yaml(path)
    assert again == schema
    assert torch.equal(again.transform(FRAME), schema.transform(FRAME))


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ([{"name": "a", "type": "numeric", "mean": 0, "std": 0}], "std must be positive"),
        ([{"name": "a", "type": "numeric", "mean": 0}], "missing 'std'"),
        ([{"name": "a", "type": "text"}], "type must be"),
        ([{"name": "a", "type": "categorical", "categories": ["x", "x"]}], "distinct"),
        ([{"name": "a", "type": "numeric", "mean": 0, "std": 1}] * 2, "listed twice: a"),
        (["a"], "mapping with a 'name'"),
    ],
)
def test_invalid_schema_is_a_clear_error(features: list, match: str) -> None:
    with pytest.raises(UserError, match=match):
        FeatureSchema.from_dict({"features": features}, source="s.yaml")


def test_unknown_schema_version_is_refused() -> None:
    data = {**fitted().to_dict(), "version": 2}
    with pytest.raises(UserError, match="schema version 2 is not supported"):
        FeatureSchema.from_dict(data)


def test_unreadable_yaml(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("features: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        FeatureSchema.from_yaml(path)
    with pytest.raises(UserError, match="cannot read schema"):
        FeatureSchema.from_yaml(tmp_path / "absent.yaml")


@settings(max_examples=40, deadline=None)
@given(
    train=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=20),
    test=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=20),
)
def test_one_hot_block_has_a_single_one_exactly_for_known_values(train: list[str], test: list[str]) -> None:
    schema = FeatureSchema.fit(pd.DataFrame({"c": train}), categorical=["c"])
    x, unseen = schema.encode(pd.DataFrame({"c": test}))
    known = np.isin(test, train)
    np.testing.assert_array_equal(x.sum(dim=1).numpy(), known.astype(np.float32))
    assert unseen.get("c", (0, ""))[0] == int((~known).sum())
    for row, value in zip(x.numpy(), test):
        if value in train:
            assert schema.feature_names[int(row.argmax())] == f"c={value}"
