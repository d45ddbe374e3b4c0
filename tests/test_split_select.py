"""Validation split and candidate selection (pure logic, hand-checked cases)."""

from __future__ import annotations

import numpy as np
import pytest

from gmn_debias.select import Selector
from gmn_debias.split import stratified_split


def test_split_is_stratified_seeded_and_disjoint() -> None:
    strata = np.array(["a|0"] * 100 + ["a|1"] * 40 + ["b|0"] * 50 + ["b|1"] * 10)
    train, val = stratified_split(strata, 0.3, seed=7)
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(strata)
    counts = {k: int(np.sum(strata[val] == k)) for k in np.unique(strata)}
    assert counts == {"a|0": 30, "a|1": 12, "b|0": 15, "b|1": 3}
    again = stratified_split(strata, 0.3, seed=7)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(strata, 0.3, seed=8)[1], val)


def test_split_keeps_singleton_stratum_in_training() -> None:
    strata = np.array(["a"] * 10 + ["b"])
    train, val = stratified_split(strata, 0.5, seed=0)
    assert 10 in train and 10 not in val


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        stratified_split(np.array(["a", "b"]), 1.0, seed=0)


def _m(gap: float | None, ap: float) -> dict:
    return {"metrics": {"demographic_parity_difference": gap, "average_precision": ap}}


def test_selector_picks_smallest_gap_within_ap_budget() -> None:
    sel = Selector("demographic_parity_difference", _m(0.20, 0.77), max_ap_drop=0.01)
    assert sel.offer(_m(0.10, 0.765)) is True  # qualifies
    assert sel.offer(_m(0.02, 0.70)) is False  # AP drop 0.07: out of budget
    assert sel.offer(_m(0.12, 0.77)) is False  # larger gap than the best
    assert sel.offer(_m(0.05, 0.761)) is True  # new best
    assert sel.offer(_m(None, 0.77)) is False  # undefined gap never wins
    assert sel.status == "selected"
    assert sel.best_key is not None and sel.best_key[0] == pytest.approx(0.05)


def test_selector_keeps_original_when_nothing_improves() -> None:
    sel = Selector("demographic_parity_difference", _m(0.05, 0.77), max_ap_drop=0.01)
    assert sel.offer(_m(0.06, 0.77)) is False  # gap worse than the input model's
    assert sel.offer(_m(0.01, 0.60)) is False
    assert sel.status == "kept_original"


def test_selector_force_takes_smallest_gap_until_one_qualifies() -> None:
    sel = Selector("demographic_parity_difference", _m(0.20, 0.77), max_ap_drop=0.01, force=True)
    assert sel.offer(_m(0.03, 0.60)) is True
    assert sel.status == "forced"
    assert sel.offer(_m(0.02, 0.50)) is True
    assert sel.offer(_m(0.15, 0.77)) is True  # a qualifying candidate beats any forced one
    assert sel.status == "selected"
    assert sel.offer(_m(0.01, 0.50)) is False


def test_selector_max_selection_drop_refuses_levelling_down() -> None:
    base = {"metrics": {"demographic_parity_difference": 0.20, "average_precision": 0.77, "selection_rate": 0.24}}

    def cand(gap: float, rate: float) -> dict:
        return {"metrics": {"demographic_parity_difference": gap, "average_precision": 0.77, "selection_rate": rate}}

    sel = Selector("demographic_parity_difference", base, max_ap_drop=0.01, max_selection_drop=0.1)
    assert sel.offer(cand(0.05, 0.12)) is False  # half the people selected: refused
    assert sel.offer(cand(0.15, 0.217)) is True  # 0.217 >= 0.24 * 0.9 = 0.216
    assert sel.offer(cand(0.10, 0.215)) is False  # just below the floor
    without = Selector("demographic_parity_difference", base, max_ap_drop=0.01)
    assert without.offer(cand(0.05, 0.12)) is True
