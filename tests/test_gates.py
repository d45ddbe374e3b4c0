"""Gates: bounds, pass/fail/undefined, the exit-code precedence, and the reports built from them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from gmn_debias.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_UNDEFINED, UserError
from gmn_debias.gates import GATES, build_gates, evaluate_gates, exit_code
from gmn_debias.metrics import audit_arrays
from gmn_debias.report import (
    audit_document,
    render_junit,
    render_markdown,
    render_table,
    to_json,
)

# case (a) of the issue: DP gap 0, TPR of group b undefined
CASE_A = audit_arrays([1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 1], ["a"] * 4 + ["b"] * 2, score_type="label")


def test_every_gate_names_a_metric_the_audit_reports() -> None:
    for metric, _ in GATES.values():
        assert metric in CASE_A["metrics"]


def test_max_and_min_bounds_are_inclusive() -> None:
    audit = {"metrics": {"demographic_parity_difference": 0.1, "average_precision": 0.7}, "undefined": {}}
    at = evaluate_gates(audit, build_gates({"max_dp": 0.1, "min_ap": 0.7}))
    assert [r.status for r in at] == ["pass", "pass"]
    over = evaluate_gates(audit, build_gates({"max_dp": 0.09, "min_ap": 0.71}))
    assert [r.status for r in over] == ["fail", "fail"]
    assert exit_code(over) == EXIT_GATE_FAILED


def test_unset_bounds_make_no_gate_and_bad_bounds_are_user_errors() -> None:
    assert build_gates({"max_dp": None}) == []
    with pytest.raises(UserError, match="max-dp"):
        build_gates({"max_dp": 1.5})


@pytest.mark.parametrize(("policy", "status", "code"), [("error", "undefined", EXIT_UNDEFINED),
                                                         ("pass", "pass", EXIT_OK),
                                                         ("fail", "fail", EXIT_GATE_FAILED)])
def test_undefined_gate_follows_on_undefined(policy: str, status: str, code: int) -> None:
    results = evaluate_gates(CASE_A, build_gates({"max_eo": 0.1}), policy)  # type: ignore[arg-type]
    assert results[0].status == status and results[0].value is None
    assert "at least two" in results[0].reason
    assert exit_code(results) == code


def test_a_failure_wins_over_an_undefined_gate() -> None:
    results = evaluate_gates(CASE_A, build_gates({"max_eo": 0.1, "min_accuracy": 0.9}))
    assert [r.status for r in results] == ["undefined", "fail"]
    assert exit_code(results) == EXIT_GATE_FAILED


def test_reports_show_each_gate() -> None:
    results = evaluate_gates(CASE_A, build_gates({"max_dp": 0.05, "max_eo": 0.1, "min_accuracy": 0.9}))
    doc = json.loads(to_json(audit_document(CASE_A, results, "error")))
    assert doc["gates"]["exit_code"] == EXIT_GATE_FAILED
    assert [g["status"] for g in doc["gates"]["results"]] == ["pass", "undefined", "fail"]
    assert {k: v for k, v in doc.items() if k != "gates"} == json.loads(json.dumps(CASE_A))
    suite = ET.fromstring(render_junit(CASE_A, results)).find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == 3
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    assert cases[1].find("error") is not None
    assert cases[2].find("failure") is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    table = render_table(CASE_A, results)
    assert "undefined" in table and "FAIL" in table and "exit 1" in table
    assert "| --min-accuracy | 0.9 |" in render_markdown(CASE_A, results)
