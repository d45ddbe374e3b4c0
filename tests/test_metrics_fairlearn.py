"""Property test: our DP / EO / EOD figures equal fairlearn's wherever fairlearn's are defined.

fairlearn turns an undefined rate into 0 (with a warning), we into None; so each metric is
compared only on inputs where every group has that rate defined. Tolerance 1e-12 (we
divide exact sums, fairlearn sums floats).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

fairlearn_metrics = pytest.importorskip("fairlearn.metrics")

from gmn_debias import metrics as ours  # noqa: E402

TOL = 1e-12


@st.composite
def cases(draw: st.DrawFn) -> dict:
    n = draw(st.integers(2, 40))
    k = draw(st.integers(2, 4))
    groups = draw(st.lists(st.sampled_from("abcd"[:k]), min_size=n, max_size=n))
    y = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    pred = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    weights = draw(st.none() | st.lists(st.floats(0.1, 5.0), min_size=n, max_size=n))
    method = draw(st.sampled_from(["between_groups", "to_overall"]))
    return {"y": np.array(y), "pred": np.array(pred), "groups": np.array(groups),
            "w": None if weights is None else np.array(weights), "method": method}


def _fairlearn(name: str, c: dict, **kw: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(getattr(fairlearn_metrics, name)(c["y"], c["pred"], sensitive_features=c["groups"],
                                                      method=c["method"], sample_weight=c["w"], **kw))


def _ours(name: str, c: dict, **kw: str) -> float | None:
    return getattr(ours, name)(c["y"], c["pred"], sensitive_features=c["groups"], method=c["method"],
                               sample_weight=c["w"], **kw)


def _every_group_has(c: dict, label: int) -> bool:
    return all(((c["groups"] == g) & (c["y"] == label)).any() for g in np.unique(c["groups"]))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_matches_fairlearn_where_defined(c: dict) -> None:
    several_groups = len(np.unique(c["groups"])) >= 2
    dp = _ours("demographic_parity_difference", c)
    assert (dp is not None) == several_groups
    if several_groups:
        assert dp == pytest.approx(_fairlearn("demographic_parity_difference", c), abs=TOL)
        ratio = _ours("demographic_parity_ratio", c)
        expected = _fairlearn("demographic_parity_ratio", c)
        assert (ratio is None) == np.isnan(expected)
        if ratio is not None:
            assert ratio == pytest.approx(expected, abs=TOL)
    has_pos, has_neg = _every_group_has(c, 1), _every_group_has(c, 0)
    if several_groups and has_pos:
        assert _ours("equal_opportunity_difference", c) == pytest.approx(
            _fairlearn("equal_opportunity_difference", c), abs=TOL)
    if several_groups and has_pos and has_neg:
        for agg in ("worst_case", "mean"):
            assert _ours("equalized_odds_difference", c, agg=agg) == pytest.approx(
                _fairlearn("equalized_odds_difference", c, agg=agg), abs=TOL)
            ours_ratio = _ours("equalized_odds_ratio", c, agg=agg)
            theirs = _fairlearn("equalized_odds_ratio", c, agg=agg)
            if ours_ratio is not None and not np.isnan(theirs):
                assert ours_ratio == pytest.approx(theirs, abs=TOL)
    # undefined exactly when fewer than two groups have positives (or negatives), never 0
    n_pos = sum(((c["groups"] == g) & (c["y"] == 1)).any() for g in np.unique(c["groups"]))
    n_neg = sum(((c["groups"] == g) & (c["y"] == 0)).any() for g in np.unique(c["groups"]))
    assert (_ours("equalized_odds_difference", c) is None) == (n_pos < 2 or n_neg < 2)
    assert (_ours("equal_opportunity_difference", c) is None) == (n_pos < 2)
