"""Metric definitions checked on hand-computed cases and against scikit-learn.

Tolerances: hand-computed rates are ratios of small integers, compared with pytest.approx
(1e-12); AP/ROC AUC against scikit-learn to 1e-12; chunked vs whole results must be equal
exactly (the sums are exact, see gmn_debias.metrics).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from gmn_debias.errors import UserError
from gmn_debias.metrics import (
    FairnessAccumulator,
    audit_arrays,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equalized_odds_difference,
    infer_score_type,
)

A4B2 = ["a"] * 4 + ["b"] * 2


def test_case_a_tpr_undefined_is_null_with_reason_not_zero() -> None:
    y = [1, 1, 0, 0, 0, 0]
    y_pred = [1, 0, 0, 1, 0, 1]
    r = audit_arrays(y, y_pred, A4B2, score_type="label")
    m, groups = r["metrics"], r["groups"]
    assert groups["a"]["true_positive_rate"] == pytest.approx(0.5)
    assert groups["b"]["true_positive_rate"] is None
    assert "no positive labels" in groups["b"]["undefined"]["true_positive_rate"]
    assert m["demographic_parity_difference"] == 0.0  # 2/4 vs 1/2
    assert m["false_positive_rate_difference"] == 0.0  # 1/2 vs 1/2
    assert m["equal_opportunity_difference"] is None
    assert "at least two" in r["undefined"]["equal_opportunity_difference"]
    # equalized odds needs both components: undefined too, and says which one is missing
    assert m["equalized_odds_difference"] is None
    assert "true_positive_rate" in r["undefined"]["equalized_odds_difference"]


def test_case_c_threshold_moves_the_dp_gap() -> None:
    scores = [0.9, 0.6, 0.4, 0.2]
    groups = ["a", "a", "b", "b"]
    y = [1, 0, 1, 0]
    assert audit_arrays(y, scores, groups, threshold=0.5)["metrics"]["demographic_parity_difference"] == 1.0
    assert audit_arrays(y, scores, groups, threshold=0.3)["metrics"]["demographic_parity_difference"] == 0.5


def test_case_d_one_group_only_parity_undefined() -> None:
    r = audit_arrays([1, 0, 1], [0.9, 0.2, 0.7], ["a", "a", "a"])
    for key in ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference",
                "equal_opportunity_difference", "mean_score_difference"):
        assert r["metrics"][key] is None, key
        assert r["undefined"][key]
    assert r["metrics"]["accuracy"] == 1.0  # overall figures still exist


def test_threshold_rule_is_score_at_least_threshold() -> None:
    groups = ["a", "b", "b"]
    at, below = 0.5, np.nextafter(0.5, 0.0)
    r = audit_arrays([1, 1, 0], [at, below, 1.0], groups, threshold=0.5)
    assert r["groups"]["a"]["selection_rate"] == 1.0  # 0.5 >= 0.5
    assert r["groups"]["b"]["selection_rate"] == 0.5  # just below is not selected
    # logits: logit 0 is probability 0.5, selected at threshold 0.5
    rl = audit_arrays([1, 1, 0], [0.0, -1e-12, 3.0], groups, threshold=0.5, score_type="logit")
    assert rl["groups"]["a"]["selection_rate"] == 1.0
    assert rl["groups"]["b"]["selection_rate"] == 0.5
    # logits at another threshold: logit(0.8) = log 4
    rt = audit_arrays([1, 0], [math.log(4) + 1e-9, math.log(4) - 1e-9], ["a", "b"], threshold=0.8, score_type="logit")
    assert (rt["groups"]["a"]["selection_rate"], rt["groups"]["b"]["selection_rate"]) == (1.0, 0.0)


def test_score_type_decided_once_for_the_column() -> None:
    assert infer_score_type(np.array([0.0, 1.0, 1.0])) == "label"
    assert infer_score_type(np.array([0.0, 0.3, 1.0])) == "probability"
    assert infer_score_type(np.array([-2.0, 0.3])) == "logit"
    # streaming: the first chunk decides, a contradicting later chunk is an error, not a switch
    acc = FairnessAccumulator()
    acc.update([1, 0], [1.0, 0.0], ["a", "b"])
    assert acc.score_type == "label"
    with pytest.raises(UserError, match="'label'.*0.7"):
        acc.update([1, 0], [0.7, 0.2], ["a", "b"])
    with pytest.raises(UserError, match="outside"):
        audit_arrays([1, 0], [1.5, 0.2], ["a", "b"], score_type="probability")


def test_label_scores_ignore_threshold_and_soft_gap_equals_hard_gap() -> None:
    r = audit_arrays([1, 0, 1, 0], [1, 1, 0, 1], ["a", "a", "b", "b"], threshold=0.99)
    assert r["score_type"] == "label" and r["threshold"] is None
    m = r["metrics"]
    assert m["demographic_parity_difference"] == 0.5
    assert m["mean_score_difference"] == m["demographic_parity_difference"]


def test_to_overall_and_ratios_by_hand() -> None:
    # a selects 1 of 5, b selects 3 of 5: overall 4/10
    groups = ["a"] * 5 + ["b"] * 5
    pred = [1, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    y = [1, 0] * 5
    between = audit_arrays(y, pred, groups)["metrics"]
    assert between["demographic_parity_difference"] == pytest.approx(0.4)
    assert between["demographic_parity_ratio"] == pytest.approx(1 / 3)
    overall = audit_arrays(y, pred, groups, method="to_overall")
    assert overall["method"] == "to_overall"
    assert overall["metrics"]["demographic_parity_difference"] == pytest.approx(0.2)
    assert overall["metrics"]["demographic_parity_ratio"] == pytest.approx(min(0.2 / 0.4, 0.4 / 0.6))


def test_nobody_selected_ratio_undefined_difference_zero() -> None:
    r = audit_arrays([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], ["a", "a", "b", "b"])
    assert r["metrics"]["demographic_parity_difference"] == 0.0
    assert r["metrics"]["demographic_parity_ratio"] is None
    assert "0" in r["undefined"]["demographic_parity_ratio"]


def test_equalized_odds_worst_case_and_mean_keep_both_components() -> None:
    # a: TPR 2/2, FPR 0/2; b: TPR 1/2, FPR 1/4  -> TPR gap 0.5, FPR gap 0.25
    y = [1, 1, 0, 0] + [1, 1, 0, 0, 0, 0]
    pred = [1, 1, 0, 0] + [1, 0, 1, 0, 0, 0]
    groups = ["a"] * 4 + ["b"] * 6
    worst = audit_arrays(y, pred, groups)["metrics"]
    mean = audit_arrays(y, pred, groups, agg="mean")["metrics"]
    assert worst["true_positive_rate_difference"] == pytest.approx(0.5)
    assert worst["false_positive_rate_difference"] == pytest.approx(0.25)
    assert worst["equalized_odds_difference"] == pytest.approx(0.5)
    assert mean["equalized_odds_difference"] == pytest.approx(0.375)
    assert worst["equal_opportunity_difference"] == pytest.approx(0.5)
    # ratios: TPR 0.5/1, FPR 0/0.25
    assert worst["equalized_odds_ratio"] == pytest.approx(0.0)
    assert mean["equalized_odds_ratio"] == pytest.approx(0.25)


def test_soft_score_gaps_overall_and_per_label() -> None:
    y = [1, 0, 1, 0]
    scores = [0.9, 0.3, 0.6, 0.1]
    m = audit_arrays(y, scores, ["a", "a", "b", "b"])["metrics"]
    assert m["mean_score_difference"] == pytest.approx(abs(0.6 - 0.35))
    assert m["mean_score_difference_positive"] == pytest.approx(0.3)
    assert m["mean_score_difference_negative"] == pytest.approx(0.2)
    assert m["mean_score_equalized_odds"] == pytest.approx(0.5)
    # logits are compared on the probability scale
    logits = np.log(np.array(scores) / (1 - np.array(scores)))
    ml = audit_arrays(y, logits, ["a", "a", "b", "b"], score_type="logit")["metrics"]
    assert ml["mean_score_difference"] == pytest.approx(m["mean_score_difference"], abs=1e-12)


def test_weights_apply_to_every_rate() -> None:
    # integer weights == repeating rows
    rng = np.random.default_rng(1)
    n = 200
    y, s = rng.integers(0, 2, n), rng.random(n)
    g = rng.choice(["a", "b", "c"], n)
    w = rng.integers(1, 4, n)
    weighted = audit_arrays(y, s, g, sample_weight=w.astype(float))
    rep = np.repeat(np.arange(n), w)
    repeated = audit_arrays(y[rep], s[rep], g[rep])
    for key, value in repeated["metrics"].items():
        assert weighted["metrics"][key] == pytest.approx(value, abs=1e-12), key
    assert weighted["groups"]["a"]["count"] == int((g == "a").sum())
    assert weighted["groups"]["a"]["weight"] == pytest.approx(float(w[g == "a"].sum()))
    with pytest.raises(UserError, match="negative"):
        audit_arrays([1, 0], [0.5, 0.5], ["a", "b"], sample_weight=[1.0, -1.0])
    with pytest.raises(UserError, match="finite"):
        audit_arrays([1, 0], [0.5, 0.5], ["a", "b"], sample_weight=[1.0, float("nan")])


@pytest.mark.parametrize("weighted", [False, True])
def test_ap_and_auc_match_scikit_learn_with_ties(weighted: bool) -> None:
    rng = np.random.default_rng(2)
    n = 3000
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n), 2)  # many ties
    w = rng.random(n) * 5 if weighted else None
    m = audit_arrays(y, s, rng.choice(["a", "b"], n), sample_weight=w)["metrics"]
    assert m["average_precision"] == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=1e-12)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def test_ap_auc_undefined_with_one_class() -> None:
    r = audit_arrays([0, 0, 0], [0.1, 0.5, 0.9], ["a", "b", "b"])
    assert r["metrics"]["roc_auc"] is None and r["metrics"]["average_precision"] is None
    assert "one class" in r["undefined"]["roc_auc"]
    r = audit_arrays([1, 1], [0.1, 0.5], ["a", "b"])
    assert r["metrics"]["average_precision"] == 1.0 and r["metrics"]["roc_auc"] is None


@pytest.mark.parametrize("weighted", [False, True])
def test_any_chunk_size_gives_identical_results(weighted: bool) -> None:
    rng = np.random.default_rng(3)
    n = 1500
    y, s = rng.integers(0, 2, n), rng.random(n)
    g = rng.choice(["F", "M"], n), rng.choice(["X", "Y", "Z"], n)
    w = rng.random(n) * 3 if weighted else None
    whole = audit_arrays(y, s, list(g), sample_weight=w, protected=["sex", "race"])
    for chunk in (1, 7, 999, 4096):
        acc = FairnessAccumulator(protected=["sex", "race"])
        for i in range(0, n, chunk):
            part = slice(i, i + chunk)
            acc.update(y[part], s[part], [g[0][part], g[1][part]], None if w is None else w[part])
        assert acc.compute() == whole, chunk  # exact equality, not approx


def test_merge_equals_one_pass() -> None:
    rng = np.random.default_rng(4)
    y, s, g = rng.integers(0, 2, 300), rng.random(300), rng.choice(["a", "b", "c"], 300)
    left, right = FairnessAccumulator(), FairnessAccumulator()
    left.update(y[:100], s[:100], g[:100])
    right.update(y[100:], s[100:], g[100:])
    left.merge(right)
    assert left.compute() == audit_arrays(y, s, g)


def test_intersectional_groups_list_empty_combinations() -> None:
    sex = ["F", "F", "M", "M"]
    race = ["X", "Y", "X", "X"]
    r = audit_arrays([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], [sex, race], protected=["sex", "race"], min_group_size=2)
    assert list(r["groups"]) == ["F|X", "F|Y", "M|X", "M|Y"]
    empty = r["groups"]["M|Y"]
    assert empty["count"] == 0 and empty["selection_rate"] is None
    assert "no rows" in empty["undefined"]["selection_rate"]
    assert r["groups"]["F|X"]["values"] == {"sex": "F", "race": "X"}
    assert r["small_groups"] == ["F|X", "F|Y", "M|Y"]
    # labels already joined by '|' (as data.py gives them) are split the same way
    joined = audit_arrays([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], ["F|X", "F|Y", "M|X", "M|X"], protected=["sex", "race"],
                          min_group_size=2)
    assert joined == r


def test_group_labels_are_text_and_declared_groups_count_zero() -> None:
    r = audit_arrays([1, 0, 1], [0.9, 0.1, 0.8], np.array([1, 1, 2]), declared_groups=["3"])
    assert list(r["groups"]) == ["1", "2", "3"]
    assert r["groups"]["3"]["count"] == 0
    with pytest.raises(UserError, match="missing"):
        audit_arrays([1, 0], [0.5, 0.5], np.array(["a", None], dtype=object))


def test_fairlearn_named_functions_return_none_when_undefined() -> None:
    y, pred = [1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 1]
    assert demographic_parity_difference(y, pred, sensitive_features=A4B2) == 0.0
    assert demographic_parity_ratio(y, pred, sensitive_features=A4B2) == 1.0
    assert equal_opportunity_difference(y, pred, sensitive_features=A4B2) is None
    assert equalized_odds_difference(y, pred, sensitive_features=A4B2) is None


@pytest.mark.parametrize("labels", [["a", "b"], ["ab", "cd", "a"], ["abc", "abd", "x", "é"], ["abcdefgh", "abcdefgi", ""]])
def test_fixed_width_string_groups_are_counted_by_label(labels: list[str]) -> None:
    rng = np.random.default_rng(6)
    groups = np.array(labels)[rng.integers(0, len(labels), 500)]  # NumPy 'U' array (fast path)
    r = audit_arrays(rng.integers(0, 2, 500), rng.random(500), groups)
    as_objects = audit_arrays(rng.integers(0, 2, 500), rng.random(500), groups.astype(object))
    assert {g: s["count"] for g, s in r["groups"].items()} == {
        g: int((groups == g).sum()) for g in sorted(set(groups.tolist()))}
    assert list(r["groups"]) == list(as_objects["groups"])


def test_exact_sums_with_many_groups_and_wide_weight_range() -> None:
    """The sparse path (groups x exponents too many for a dense count) sums exactly too."""
    from fractions import Fraction

    rng = np.random.default_rng(7)
    n = 400
    groups = rng.integers(0, 300, n).astype(str)
    w = 10.0 ** rng.uniform(-200, 200, n)
    r = audit_arrays(np.ones(n, dtype=int), np.full(n, 0.7), groups, sample_weight=w)
    for g, stats in r["groups"].items():
        exact = sum((Fraction(x) for x in w[groups == g]), Fraction(0))
        assert stats["weight"] == float(exact), g  # correctly rounded exact sum
