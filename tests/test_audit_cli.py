"""``gmn-debias audit`` end to end with typer's CliRunner: exit codes, outputs, bad input."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, invoke

from gmn_debias.checkpoint import load_model
from gmn_debias.data import load_labelled
from gmn_debias.metrics import audit_arrays
from gmn_debias.predict import predict_scores

CONTRACT_METRICS = ("demographic_parity_difference", "demographic_parity_ratio", "equal_opportunity_difference",
                    "equalized_odds_difference", "accuracy", "average_precision", "roc_auc")
CONTRACT_GROUP = ("count", "selection_rate", "true_positive_rate", "false_positive_rate")


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def case_a(tmp_path: Path) -> Path:
    """Issue case (a): y=[1,1,0,0 | 0,0], prediction=[1,0,0,1 | 0,1], groups a | b."""
    return _csv(tmp_path / "a.csv", "y,pred,g", ["1,1,a", "1,0,a", "0,0,a", "0,1,a", "0,0,b", "0,1,b"])


def _scores_args(path: Path, *extra: str) -> list[str]:
    return ["audit", "--scores", str(path), "--score-col", "pred", "--label", "y", "--protected", "g", *extra]


def test_case_a_json_contract_and_exit_3_when_gated(case_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    result = invoke(_scores_args(case_a, "--max-eo", "0.1", "--max-dp", "0.1", "--json", str(out)))
    assert result.exit_code == 3, result.output
    doc = json.loads(out.read_text())
    for key in CONTRACT_METRICS:
        assert key in doc["metrics"]
    for group in doc["groups"].values():
        for key in CONTRACT_GROUP:
            assert key in group
    assert doc["metrics"]["equal_opportunity_difference"] is None
    assert doc["metrics"]["demographic_parity_difference"] == 0.0
    assert doc["groups"]["b"]["true_positive_rate"] is None
    assert doc["score_type"] == "label"
    assert [g["status"] for g in doc["gates"]["results"]] == ["pass", "undefined"]
    assert "undefined" in result.stdout


@pytest.mark.parametrize(("policy", "code"), [("pass", 0), ("fail", 1)])
def test_on_undefined_policy(case_a: Path, policy: str, code: int) -> None:
    assert invoke(_scores_args(case_a, "--max-eo", "0.1", "--on-undefined", policy)).exit_code == code


def test_case_b_leading_space_does_not_make_a_third_group(tmp_path: Path) -> None:
    path = _csv(tmp_path / "b.csv", "y,pred,g", ["1,1,1", "0,0,1", "1,1,2", "0,1,2", "1,0, 1"])
    out = tmp_path / "b.json"
    assert invoke(_scores_args(path, "--json", str(out))).exit_code == 0
    doc = json.loads(out.read_text())
    assert list(doc["groups"]) == ["1", "2"]
    assert doc["groups"]["1"]["count"] == 3


@pytest.mark.parametrize(("threshold", "code"), [("0.5", 1), ("0.3", 0)])
def test_case_c_threshold_and_gate(tmp_path: Path, threshold: str, code: int) -> None:
    path = _csv(tmp_path / "c.csv", "y,pred,g", ["1,0.9,a", "0,0.6,a", "1,0.4,b", "0,0.2,b"])
    out = tmp_path / "c.json"
    result = invoke(_scores_args(path, "--threshold", threshold, "--max-dp", "0.6", "--json", str(out)))
    assert result.exit_code == code, result.output
    expected = {"0.5": 1.0, "0.3": 0.5}[threshold]
    assert json.loads(out.read_text())["metrics"]["demographic_parity_difference"] == expected


def test_case_d_one_group_gated_exits_3(tmp_path: Path) -> None:
    path = _csv(tmp_path / "d.csv", "y,pred,g", ["1,0.9,a", "0,0.6,a", "1,0.4,a"])
    result = invoke(_scores_args(path, "--max-dp", "0.1"))
    assert result.exit_code == 3
    assert invoke(_scores_args(path)).exit_code == 0  # ungated: reported, not an error


def test_case_e_empty_cell_and_na_label(tmp_path: Path) -> None:
    path = _csv(tmp_path / "e.csv", "y,pred,g", ["1,0.9,NA", "0,0.2,NA", "1,0.7,", "0,0.6,x"])
    assert_one_line_error(invoke(_scores_args(path)), "'g'", "3")
    out = tmp_path / "e.json"
    assert invoke(_scores_args(path, "--missing-groups", "group", "--json", str(out))).exit_code == 0
    groups = json.loads(out.read_text())["groups"]
    assert set(groups) == {"NA", "<missing>", "x"}
    assert groups["NA"]["count"] == 2
    assert invoke(_scores_args(path, "--missing-groups", "drop", "--json", str(out))).exit_code == 0
    assert set(json.loads(out.read_text())["groups"]) == {"NA", "x"}


def test_intersectional_weighted_outputs(tmp_path: Path) -> None:
    path = _csv(tmp_path / "i.csv", "y,p,sex,race,w",
                ["1,0.9,F,X,1", "0,0.2,F,Y,2", "1,0.7,M,X,0.5", "0,0.6,M,X,1", "1,0.4,F,X,1"])
    js, md, junit = tmp_path / "o.json", tmp_path / "o.md", tmp_path / "o.xml"
    result = invoke(["audit", "--scores", path, "--score-col", "p", "--label", "y", "-p", "sex", "-p", "race",
                     "--weight", "w", "--min-group-size", "2", "--max-dp", "1", "--min-auc", "0.99",
                     "--json", js, "--markdown", md, "--junit", junit])
    assert result.exit_code == 1  # AUC gate fails
    doc = json.loads(js.read_text())
    assert list(doc["groups"]) == ["F|X", "F|Y", "M|X", "M|Y"]
    assert doc["groups"]["M|Y"]["count"] == 0 and doc["weighted"] is True
    assert doc["groups"]["M|X"]["selection_rate"] == pytest.approx(1.0)
    assert doc["groups"]["F|X"]["selection_rate"] == pytest.approx(0.5)
    assert set(doc["small_groups"]) == {"F|Y", "M|Y"}
    cases = ET.parse(junit).getroot().iter("testcase")
    assert [c.find("failure") is not None for c in cases] == [False, True]
    assert "F\\|X" in md.read_text()


def test_chunk_size_does_not_change_the_cli_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [f"{rng.integers(0, 2)},{rng.random():.6f},{rng.choice(['a', 'b', 'c'])},{rng.random() * 2:.4f}"
            for _ in range(3000)]
    path = _csv(tmp_path / "big.csv", "y,p,g,w", rows)
    outs = []
    for chunk in ("65536", "7", "1000"):
        out = tmp_path / f"{chunk}.json"
        args = ["audit", "--scores", path, "--score-col", "p", "--label", "y", "-p", "g", "--weight", "w",
                "--chunk-size", chunk, "--json", out]
        assert invoke(args).exit_code == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] == outs[2]


def test_score_type_is_decided_for_the_whole_column(tmp_path: Path) -> None:
    # the first chunk looks like hard labels; the whole column is probabilities
    path = _csv(tmp_path / "s.csv", "y,p,g", ["1,1,a", "0,0,b", "1,0.7,a", "0,0.2,b"])
    out = tmp_path / "s.json"
    args = ["audit", "--scores", path, "--score-col", "p", "--label", "y", "-p", "g", "--chunk-size", "2"]
    assert invoke([*args, "--json", out]).exit_code == 0
    assert json.loads(out.read_text())["score_type"] == "probability"
    assert_one_line_error(invoke([*args, "--score-type", "label"]), "label", "0.7")


@pytest.mark.parametrize(("args", "fragments"), [
    (["--score-col", "nope"], ["no column 'nope'"]),
    ([], ["--score-col"]),
    (["--score-col", "pred", "--weight", "w"], ["negative"]),
    (["--score-col", "txt"], ["'txt'", "numeric"]),
    (["--score-col", "pred", "--threshold", "2"], ["threshold"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    path = _csv(tmp_path / "bad.csv", "y,pred,g,w,txt", ["1,0.9,a,1,x", "0,0.2,b,-1,y"])
    result = invoke(["audit", "--scores", path, "--label", "y", "-p", "g", *args])
    assert_one_line_error(result, *fragments)


def test_needs_model_and_data_or_scores(tmp_path: Path, case_a: Path) -> None:
    assert_one_line_error(invoke(["audit", "-p", "g"]), "MODEL DATA")
    assert_one_line_error(invoke(["audit", str(case_a), "--scores", str(case_a), "--score-col", "pred", "-p", "g"]),
                          "either")


def test_never_overwrites_an_input(case_a: Path) -> None:
    before = case_a.read_text()
    assert_one_line_error(invoke(_scores_args(case_a, "--json", str(case_a))), "refusing")
    assert case_a.read_text() == before


def test_gates_from_a_yaml_config(case_a: Path, tmp_path: Path) -> None:
    config = tmp_path / "audit.yaml"
    config.write_text("protected: g\nlabel: y\ngates:\n  max_dp: 0.1\n  max-eo: 0.1\non_undefined: fail\n")
    result = invoke(["audit", "--scores", case_a, "--score-col", "pred", "--config", config])
    assert result.exit_code == 1, result.output


def test_model_mode_reproduces_audit_arrays(sample_model: Path, holdout_csv: Path, tmp_path: Path) -> None:
    """The CLI on a model equals audit_arrays on the same scores (what fit's report uses)."""
    out = tmp_path / "model.json"
    result = invoke(["audit", sample_model, holdout_csv, "-p", "sex", "--chunk-size", "4000", "--json", out, "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    loaded = load_model(sample_model)
    data = load_labelled(holdout_csv, schema=loaded.schema, protected=["sex"])
    scores = predict_scores(loaded.model, data.x)
    expected = audit_arrays(data.y.numpy(), scores, data.groups, protected=["sex"])
    doc.pop("gates")
    assert doc == json.loads(json.dumps(expected))
    assert set(doc["groups"]) == {"Female", "Male"}
    assert 0.5 < doc["metrics"]["roc_auc"] <= 1.0
