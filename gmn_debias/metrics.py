"""Group fairness and accuracy metrics from streaming per-group sufficient statistics.

Definitions follow fairlearn (``demographic_parity_difference``, ``equalized_odds_difference``
with ``method="between_groups" | "to_overall"`` and ``agg="worst_case" | "mean"``), with one
deliberate difference: a rate that does not exist (TPR of a group without positives) is
``None`` with a reason and is left out of the gap, instead of silently becoming 0.

:class:`FairnessAccumulator` keeps, per group, exact sums (weight, positives, selections,
true positives, scores) and, for AP/ROC AUC, the scores themselves. Sums are kept as exact
integers (in units of 2**-1126, the smallest float64 quantum of a product), so any chunking
of the rows gives bit-identical results and memory does not grow with the rows except for
the scores that exact AP/AUC need (8 bytes a row, 16 with weights). Shape follows
torchmetrics' ``Metric``: ``update`` per chunk, ``merge`` / ``sync`` across workers,
``compute`` at the end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import UserError

ScoreType = Literal["probability", "logit", "label"]
Method = Literal["between_groups", "to_overall"]
Agg = Literal["worst_case", "mean"]
SCORE_TYPES: tuple[str, ...] = ("probability", "logit", "label")
METHODS: tuple[str, ...] = ("between_groups", "to_overall")
AGGS: tuple[str, ...] = ("worst_case", "mean")
GROUP_SEP = "|"

_SCALE = 1126  # float64 values are integer multiples of 2**-1074; frexp mantissas add 53 bits
_SLICE = 1 << 18  # rows per exact-sum pass: bounds temporaries, keeps bincount sums < 2**53
_STATS = ("weight", "positives", "selected", "true_positives", "score", "score_positives")
_MAX_EMPTY_COMBINATIONS = 10_000


def _exact_group_sums(values: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Exact per-group sums of float64 rows ``values`` (S, N <= _SLICE), in 2**-_SCALE units.

    Float addition depends on order, so chunked sums would differ in the last bits; split
    every value into an integer mantissa (two 26/27-bit halves) and an exponent, sum the
    halves per (row, group, exponent) with bincount (exact below 2**53), then shift into
    Python integers.
    """
    n_stats = values.shape[0]
    out = np.zeros((n_stats, k), dtype=object)
    mant, exp = np.frexp(values)
    m = (mant * 2.0**53).astype(np.int64)
    hi, lo = m >> 26, m & ((1 << 26) - 1)
    emin = int(exp.min())
    span = int(exp.max()) - emin + 1
    key = ((np.arange(n_stats)[:, None] * k + codes[None, :]) * span + (exp - emin)).ravel()
    size = n_stats * k * span
    cells = None
    if size > 4 * key.size:  # many groups x a wide exponent range: count only the cells present
        cells, key = np.unique(key, return_inverse=True)
        size = cells.size
    hs = np.bincount(key, weights=hi.ravel(), minlength=size)
    ls = np.bincount(key, weights=lo.ravel(), minlength=size)
    for idx in np.flatnonzero((hs != 0) | (ls != 0)).tolist():
        row, rest = divmod(idx if cells is None else int(cells[idx]), k * span)
        group, e = divmod(rest, span)
        out[row, group] += ((int(hs[idx]) << 26) + int(ls[idx])) << (e + emin - 53 + _SCALE)
    return out


def _ratio(num: int, den: int) -> float:
    """Correctly rounded ``num / den`` of exact sums (Python int division rounds correctly)."""
    return num / den


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (no overflow warnings for large |x|)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def infer_score_type(scores: np.ndarray) -> str:
    """Hard labels if every value is 0/1, probabilities if all lie in [0, 1], else logits."""
    if scores.size and np.all((scores == 0) | (scores == 1)):
        return "label"
    if scores.size == 0 or (scores.min() >= 0 and scores.max() <= 1):
        return "probability"
    return "logit"


def _check_scores(scores: np.ndarray, score_type: str, inferred: bool) -> None:
    """Scores must fit the column's type; a contradiction is an error, never a silent switch."""
    how = "inferred from the first rows" if inferred else "for the whole column"
    fix = "; choose with --score-type (score_type= in Python)"
    if score_type == "probability" and scores.size and (scores.min() < 0 or scores.max() > 1):
        bad = float(scores[(scores < 0) | (scores > 1)][0])
        raise UserError(f"scores are read as 'probability' ({how}) but one is {bad!r}, outside [0, 1]{fix}")
    if score_type == "label" and not np.all((scores == 0) | (scores == 1)):
        bad = float(scores[(scores != 0) & (scores != 1)][0])
        raise UserError(f"scores are read as 'label' ({how}) but one is {bad!r}, not 0 or 1{fix}")


def _as_binary(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number):
        raise UserError(f"labels must be 0/1 numbers or booleans, got dtype {y.dtype}")
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise UserError(f"labels must be 0 or 1; row {int(np.flatnonzero(bad)[0])} holds {y[bad][0]!r}")
    return y == 1


def _as_float(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    bad = ~np.isfinite(arr)
    if bad.any():
        raise UserError(f"{what} must be finite numbers; row {int(np.flatnonzero(bad)[0])} holds {arr[bad][0]!r}")
    return arr


def _group_columns(groups: Any, n_columns: int | None) -> list[Any]:
    """Split ``groups`` into protected columns (a DataFrame, 2-D array, list of columns or 1-D)."""
    if isinstance(groups, pd.DataFrame):
        return [groups[c] for c in groups.columns]
    if isinstance(groups, (list, tuple)) and groups and not np.isscalar(groups[0]):
        return list(groups)
    if isinstance(groups, np.ndarray) and groups.ndim == 2:
        return [groups[:, j] for j in range(groups.shape[1])]
    if n_columns and n_columns > 1:
        split = pd.Series(np.asarray(groups, dtype=object)).str.split(GROUP_SEP, regex=False, expand=True)
        if split.shape[1] != n_columns:
            raise UserError(f"intersectional group labels must have {n_columns} parts joined by '{GROUP_SEP}'")
        return [split[j] for j in range(n_columns)]
    return [groups]


def _factorize_fixed_width(arr: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Factorize a NumPy ``U`` array by hashing its characters as integers (no Python objects).

    Converting millions of fixed-width strings to objects costs more than all the metric
    arithmetic, so factorize the raw characters, 8 bytes (two characters) at a time where
    the width allows, and combine the codes; short labels take a single pass.
    """
    flat = np.ascontiguousarray(arr.reshape(-1))
    unit = np.uint64 if flat.dtype.itemsize % 8 == 0 else np.uint32
    words = flat.view(unit).reshape(flat.size, -1)
    codes, _ = pd.factorize(words[:, 0])
    for j in range(1, words.shape[1]):
        col_codes, col_uniques = pd.factorize(words[:, j])
        codes, _ = pd.factorize(codes * len(col_uniques) + col_codes)
    k = int(codes.max()) + 1 if codes.size else 0
    first = np.searchsorted(np.maximum.accumulate(codes), np.arange(k))  # codes follow first appearance
    return codes, [str(v) for v in flat[first]]


def _text_codes(column: Any) -> tuple[np.ndarray, list[str]]:
    """Codes and text labels of one protected column; labels are text, never positions/floats."""
    if isinstance(column, pd.Series) and isinstance(column.dtype, pd.CategoricalDtype):
        column = column.array
    if isinstance(column, pd.Categorical):
        codes, uniques = np.asarray(column.codes), [str(c) for c in column.categories]
    else:
        arr = np.asarray(column).ravel()
        if arr.dtype.kind == "U" and arr.dtype.itemsize:
            codes, uniques = _factorize_fixed_width(arr)
        else:
            codes, raw = pd.factorize(arr.astype(object) if arr.dtype.kind == "S" else arr, use_na_sentinel=True)
            uniques = [str(u) for u in raw]
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise UserError(f"group labels are missing (row {row}); give every row a group")
    return np.asarray(codes, dtype=np.int64), uniques


class _ScoreStore:
    """Scores kept split by label for exact AP and ROC AUC (sorted once, in place)."""

    def __init__(self) -> None:
        self.parts: dict[bool, list[tuple[np.ndarray, np.ndarray | None]]] = {True: [], False: []}

    def update(self, scores: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        for label in (True, False):
            mask = y == label
            self.parts[label].append((scores[mask], None if w is None else w[mask]))

    def merge(self, other: _ScoreStore) -> None:
        for label in (True, False):
            self.parts[label].extend(other.parts[label])

    def _sorted(self, label: bool, weighted: bool) -> tuple[np.ndarray, _Cumulative]:
        """Ascending scores and their cumulative weights; the sorted arrays replace the parts.

        Ties are ordered by weight too, so the order (and every float sum) depends only on
        the multiset of rows, never on how they were chunked.
        """
        parts = self.parts[label]
        scores = np.concatenate([p[0] for p in parts]) if parts else np.empty(0)
        weights = None
        if weighted:
            weights = np.concatenate([p[1] for p in parts]) if parts else np.empty(0)  # type: ignore[misc]
            order = np.lexsort((weights, scores))
            scores, weights = scores[order], weights[order]
        else:
            scores.sort()
        self.parts[label] = [(scores, weights)]
        return scores, _Cumulative(scores.size, weights)

    def compute(self, weighted: bool) -> tuple[float | None, float | None, dict[str, str]]:
        """(average_precision, roc_auc, reasons) exactly as scikit-learn defines them."""
        pos, cpos = self._sorted(True, weighted)
        neg, cneg = self._sorted(False, weighted)
        w_pos, w_neg = cpos.total, cneg.total
        reasons: dict[str, str] = {}
        if w_pos <= 0:
            reasons["average_precision"] = "no positive labels"
            reasons["roc_auc"] = "only one class in the labels (no positives)"
            return None, None, reasons
        # one term per distinct positive score t; `at_t` is the positive weight at t
        starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
        at_t = cpos[np.r_[starts[1:], pos.size]] - cpos[starts]
        below = cneg[np.searchsorted(neg, pos[starts], side="left")]  # negative weight < t
        # AP = sum_t (at_t / W+) * precision(score >= t)
        tp = w_pos - cpos[starts]
        ap = float(np.sum(at_t * (tp / (tp + (w_neg - below)))) / w_pos)
        if w_neg <= 0:
            reasons["roc_auc"] = "only one class in the labels (no negatives)"
            return ap, None, reasons
        # ROC AUC = P(score+ > score-) + 0.5 P(tie), weighted (Mann-Whitney)
        upto = cneg[np.searchsorted(neg, pos[starts], side="right")]  # negative weight <= t
        auc = float(np.sum(at_t * (below + 0.5 * (upto - below))) / w_pos / w_neg)
        return ap, auc, reasons


class _Cumulative:
    """C[k] = total weight of the first k sorted rows; unweighted, simply k (no array)."""

    def __init__(self, n: int, weights: np.ndarray | None) -> None:
        self.cum = None if weights is None else np.concatenate(([0.0], np.cumsum(weights)))
        self.total = float(n) if self.cum is None else float(self.cum[-1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(idx, dtype=np.float64) if self.cum is None else self.cum[idx]


class FairnessAccumulator:
    """Streaming group-fairness metrics: ``update`` per chunk, ``compute`` at the end.

    ``score_type`` None infers it from the first chunk and then checks every later chunk
    against it (an error, never a silent switch). ``threshold`` is on the probability scale;
    a row is selected when ``score >= threshold`` (logits: ``logit >= log(t / (1 - t))``).
    ``protected`` names the protected columns (only echoed, and used to split "a|b" labels);
    ``declared_groups`` are listed with count 0 when absent. ``keep_scores=False`` skips
    AP/AUC and the memory they need.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        score_type: ScoreType | None = None,
        method: Method = "between_groups",
        agg: Agg = "worst_case",
        min_group_size: int | None = None,
        protected: Sequence[str] | None = None,
        declared_groups: Sequence[str] | None = None,
        keep_scores: bool = True,
    ) -> None:
        if score_type is not None and score_type not in SCORE_TYPES:
            raise ValueError(f"score_type must be one of {SCORE_TYPES}, got {score_type!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if agg not in AGGS:
            raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"threshold must lie in [0, 1] (probability scale), got {threshold}")
        self.threshold = float(threshold)
        self.score_type: str | None = score_type
        self._inferred = score_type is None
        self.method, self.agg = method, agg
        self.min_group_size = min_group_size
        self.protected = list(protected) if protected else None
        self.keep_scores = keep_scores
        self.reset()
        for label in declared_groups or ():
            self._group_index(tuple(str(label).split(GROUP_SEP)) if self._n_columns() > 1 else (str(label),))

    def _n_columns(self) -> int:
        return len(self.protected) if self.protected else 1

    def reset(self) -> None:
        """Forget every row seen (keeps the settings)."""
        self._keys: list[tuple[str, ...]] = []
        self._index: dict[tuple[str, ...], int] = {}
        self._column_values: list[dict[str, None]] = [{} for _ in range(self._n_columns())]
        self._counts: list[int] = []
        self._sums = np.zeros((len(_STATS), 0), dtype=object)
        self._scores = _ScoreStore()
        self._weighted: bool | None = None

    def _group_index(self, key: tuple[str, ...]) -> int:
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self._keys)
            self._keys.append(key)
            self._counts.append(0)
            self._sums = np.concatenate([self._sums, np.zeros((len(_STATS), 1), dtype=object)], axis=1)
            for values, part in zip(self._column_values, key):
                values.setdefault(part)
        return idx

    def _codes(self, groups: Any, n: int) -> np.ndarray:
        columns = _group_columns(groups, self._n_columns())
        if self.protected is None and len(columns) > 1:
            self.protected = [f"column {j}" for j in range(len(columns))]
            self._column_values = [{} for _ in columns]
        if len(columns) != self._n_columns():
            raise UserError(f"expected {self._n_columns()} protected column(s), got {len(columns)}")
        combined: np.ndarray | None = None
        labels: list[list[str]] = []
        for column in columns:
            codes, uniques = _text_codes(column)
            if codes.size != n:
                raise UserError(f"group labels have {codes.size} rows but the scores have {n}")
            combined = codes if combined is None else combined * len(uniques) + codes
            labels.append(uniques)
        assert combined is not None
        local, present = pd.factorize(combined) if len(columns) > 1 else (combined, np.arange(len(labels[0])))
        mapping = np.empty(len(present), dtype=np.int64)
        for j, code in enumerate(np.asarray(present).tolist()):
            parts = []
            for uniques in reversed(labels):
                code, r = divmod(code, len(uniques))
                parts.append(uniques[r])
            mapping[j] = self._group_index(tuple(reversed(parts)))
        return mapping[local.ravel()]

    def update(self, y_true: Any, y_score: Any, groups: Any, sample_weight: Any = None) -> None:
        """Add a chunk of rows: 0/1 labels, scores, group labels (1-D, or one column each)."""
        y = _as_binary(y_true).ravel()
        scores = _as_float(y_score, "scores")
        if scores.size != y.size:
            raise UserError(f"{y.size} labels but {scores.size} scores")
        weighted = sample_weight is not None
        if self._weighted is not None and weighted != self._weighted:
            raise UserError("sample weights must be given for every chunk or for none")
        self._weighted = weighted
        w = None
        if weighted:
            w = _as_float(sample_weight, "sample weights")
            if w.size != y.size:
                raise UserError(f"{y.size} labels but {w.size} sample weights")
            if (w < 0).any():
                raise UserError(f"sample weights must not be negative (row {int(np.flatnonzero(w < 0)[0])})")
        if y.size == 0:
            return  # an empty chunk must not decide the score type
        if self.score_type is None:
            self.score_type = infer_score_type(scores)
        _check_scores(scores, self.score_type, self._inferred)
        codes = self._codes(groups, y.size)
        selected, prob = self._select(scores)
        k = len(self._keys)
        self._counts = [a + b for a, b in zip(self._counts, np.bincount(codes, minlength=k).tolist())]
        for start in range(0, y.size, _SLICE):
            part = slice(start, start + _SLICE)
            self._sums = self._sums + self._slice_sums(y[part], selected[part], prob[part], codes[part],
                                                       None if w is None else w[part], k,
                                                       self.score_type == "label")
        if self.keep_scores:
            self._scores.update(scores, y, w)

    @staticmethod
    def _slice_sums(y: np.ndarray, selected: np.ndarray, prob: np.ndarray, codes: np.ndarray,
                    w: np.ndarray | None, k: int, label_scores: bool) -> np.ndarray:
        """Exact sums of the _STATS for one slice (counts by bincount when unweighted)."""
        if w is None:
            # one bincount over (group, label, selected) gives n, positives, selected, TP
            cells = np.bincount(codes * 4 + y * 2 + selected, minlength=4 * k).reshape(k, 4)
            counts = np.stack([cells.sum(1), cells[:, 2:].sum(1), cells[:, 1::2].sum(1), cells[:, 3]])
            exact = np.vectorize(lambda c: int(c) << _SCALE, otypes=[object])(counts)
            if label_scores:  # the score is the selection: its sums are counts too
                return np.concatenate([exact, exact[[2, 3]]])
            scores = _exact_group_sums(np.stack([prob, np.where(y, prob, 0.0)]), codes, k)
            return np.concatenate([exact, scores])
        rows = np.stack([w, np.where(y, w, 0.0), np.where(selected, w, 0.0),
                         np.where(y & selected, w, 0.0), w * prob, np.where(y, w * prob, 0.0)])
        return _exact_group_sums(rows, codes, k)

    def _select(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(selected, probability-scale score) under the column's score type."""
        if self.score_type == "label":
            return scores == 1, scores
        if self.score_type == "logit":
            t = self.threshold
            cut = -math.inf if t == 0 else math.inf if t == 1 else math.log(t) - math.log1p(-t)
            return scores >= cut, sigmoid(scores)
        return scores >= self.threshold, scores

    def merge(self, other: FairnessAccumulator) -> None:
        """Add another accumulator's rows (same settings), e.g. from another worker."""
        if other.score_type is not None:
            if self.score_type is None:
                self.score_type = other.score_type
            elif other.score_type != self.score_type:
                raise UserError(f"cannot merge score types {self.score_type!r} and {other.score_type!r}")
        if other._weighted is not None and self._weighted is not None and other._weighted != self._weighted:
            raise UserError("cannot merge weighted and unweighted rows")
        self._weighted = other._weighted if self._weighted is None else self._weighted
        for j, key in enumerate(other._keys):
            i = self._group_index(key)
            self._counts[i] += other._counts[j]
            self._sums[:, i] = self._sums[:, i] + other._sums[:, j]
        self._scores.merge(other._scores)

    def sync(self, process_group: Any = None) -> None:
        """Merge the states of all ``torch.distributed`` ranks so each rank holds the total.

        Groups can differ between ranks, so the states travel as objects (all_gather_object)
        and are merged in rank order; a no-op without an initialised process group.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        gathered: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, self, group=process_group)
        self.reset()
        for state in gathered:
            self.merge(state)

    # ---- compute -------------------------------------------------------------------------

    def _all_keys(self) -> list[tuple[str, ...]]:
        """Observed groups plus, for several columns, every empty combination (count 0)."""
        keys = set(self._keys)
        n_combos = math.prod(len(v) for v in self._column_values)
        if self._n_columns() > 1 and n_combos <= _MAX_EMPTY_COMBINATIONS:
            keys.update(itertools.product(*self._column_values))
        return sorted(keys)

    def compute(self) -> dict[str, Any]:
        """The audit object (the ``audit --json`` layout minus gates); see :func:`audit_arrays`."""
        keys = self._all_keys()
        total = self._sums.sum(axis=1) if self._keys else np.zeros(len(_STATS), dtype=object)
        overall = _rates(sum(self._counts), total)
        groups: dict[str, dict[str, Any]] = {}
        for key in keys:
            i = self._index.get(key)
            if i is None:
                stats = _rates(0, np.zeros(len(_STATS), dtype=object))
            else:
                stats = _rates(self._counts[i], self._sums[:, i])
            if self._n_columns() > 1:
                stats["values"] = dict(zip(self.protected or [], key))
            if self.min_group_size is not None:
                stats["small"] = stats["count"] < self.min_group_size
            groups[GROUP_SEP.join(key)] = stats
        metrics, undefined = self._fairness(groups, overall)
        metrics["accuracy"] = overall["accuracy"]
        metrics["selection_rate"] = overall["selection_rate"]
        for field in ("accuracy", "selection_rate"):
            if field in overall["undefined"]:
                undefined[field] = overall["undefined"][field]
        if self.keep_scores:
            ap, auc, reasons = self._scores.compute(bool(self._weighted))
            metrics["average_precision"], metrics["roc_auc"] = ap, auc
            undefined.update(reasons)
        small = [g for g, s in groups.items() if s.get("small")]
        return {
            "method": self.method,
            "agg": self.agg,
            "threshold": None if self.score_type == "label" else self.threshold,
            "score_type": self.score_type,
            "protected": self.protected,
            "weighted": bool(self._weighted),
            "n_rows": overall["count"],
            "min_group_size": self.min_group_size,
            "small_groups": small,
            "metrics": metrics,
            "undefined": undefined,
            "groups": groups,
            "overall": overall,
        }

    def _fairness(self, groups: dict[str, dict[str, Any]], overall: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        metrics: dict[str, Any] = {}
        undefined: dict[str, str] = {}

        def gap(rate: str, name: str) -> None:
            values = {g: s[rate] for g, s in groups.items()}
            diff, ratio, reason = _gap(values, overall[rate], self.method, rate)
            metrics[f"{name}_difference"], metrics[f"{name}_ratio"] = diff, ratio
            for suffix, value in (("difference", diff), ("ratio", ratio)):
                if value is None:
                    undefined[f"{name}_{suffix}"] = reason or f"every group's {rate} is 0"

        gap("selection_rate", "demographic_parity")
        gap("true_positive_rate", "true_positive_rate")
        gap("false_positive_rate", "false_positive_rate")
        for suffix in ("difference", "ratio"):
            tpr, fpr = metrics[f"true_positive_rate_{suffix}"], metrics[f"false_positive_rate_{suffix}"]
            metrics[f"equal_opportunity_{suffix}"] = tpr
            if f"true_positive_rate_{suffix}" in undefined:
                undefined[f"equal_opportunity_{suffix}"] = undefined[f"true_positive_rate_{suffix}"]
            key = f"equalized_odds_{suffix}"
            if tpr is None or fpr is None:
                metrics[key] = None
                missing = "true_positive_rate" if tpr is None else "false_positive_rate"
                undefined[key] = f"{missing}_{suffix} is undefined: {undefined[f'{missing}_{suffix}']}"
            elif self.agg == "mean":
                metrics[key] = (tpr + fpr) / 2
            else:
                metrics[key] = max(tpr, fpr) if suffix == "difference" else min(tpr, fpr)
        for rate, name in (("mean_score", "mean_score_difference"),
                           ("mean_score_positive", "mean_score_difference_positive"),
                           ("mean_score_negative", "mean_score_difference_negative")):
            values = {g: s[rate] for g, s in groups.items()}
            metrics[name], _, reason = _gap(values, overall[rate], self.method, rate)
            if metrics[name] is None:
                undefined[name] = reason or ""
        pos, neg = metrics["mean_score_difference_positive"], metrics["mean_score_difference_negative"]
        metrics["mean_score_equalized_odds"] = None if pos is None or neg is None else pos + neg
        if metrics["mean_score_equalized_odds"] is None:
            undefined["mean_score_equalized_odds"] = "a per-label mean-score gap is undefined"
        return metrics, undefined


def _rates(count: int, sums: np.ndarray) -> dict[str, Any]:
    """Per-group (or overall) figures from exact sums; undefined rates are None + reason."""
    w, pos, sel, tp, score, score_pos = (int(v) for v in sums)
    neg, fp = w - pos, sel - tp
    correct = tp + (neg - fp)
    unit = 1 << _SCALE
    undefined: dict[str, str] = {}

    def rate(name: str, num: int, den: int, reason: str) -> float | None:
        if den <= 0:
            undefined[name] = reason
            return None
        return _ratio(num, den)

    empty = "no rows in this group" if count == 0 else "total sample weight is 0"
    out: dict[str, Any] = {
        "count": int(count),
        "weight": _ratio(w, unit),
        "positives": _ratio(pos, unit),
        "negatives": _ratio(neg, unit),
    }
    out["selection_rate"] = rate("selection_rate", sel, w, empty)
    out["true_positive_rate"] = rate("true_positive_rate", tp, pos, "no positive labels" if w > 0 else empty)
    out["false_positive_rate"] = rate("false_positive_rate", fp, neg, "no negative labels" if w > 0 else empty)
    out["accuracy"] = rate("accuracy", correct, w, empty)
    out["mean_score"] = rate("mean_score", score, w, empty)
    out["mean_score_positive"] = rate("mean_score_positive", score_pos, pos, "no positive labels" if w > 0 else empty)
    out["mean_score_negative"] = rate("mean_score_negative", score - score_pos, neg, "no negative labels" if w > 0 else empty)
    out["undefined"] = undefined
    return out


def _gap(values: dict[str, float | None], overall: float | None, method: str, rate: str) -> tuple[float | None, float | None, str | None]:
    """(difference, ratio, reason if undefined) over the groups where ``rate`` is defined."""
    defined = {g: v for g, v in values.items() if v is not None}
    if len(defined) < 2:
        missing = sorted(set(values) - set(defined))
        detail = f"; undefined for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else ""
        reason = f"{rate} is defined for {len(defined)} group(s), at least two are needed{detail}"
        return None, None, reason
    vals = list(defined.values())
    if method == "between_groups":
        lo, hi = min(vals), max(vals)
        return hi - lo, (lo / hi if hi > 0 else None), None
    assert overall is not None  # two groups with a defined rate imply a defined overall rate
    diff = max(abs(v - overall) for v in vals)
    if overall <= 0:
        return diff, None, f"overall {rate} is 0"
    ratio = min((v / overall if v <= overall else overall / v) for v in vals)
    return diff, ratio, None


def audit_arrays(
    y_true: Any,
    y_score: Any,
    groups: Any,
    *,
    threshold: float = 0.5,
    sample_weight: Any = None,
    method: Method = "between_groups",
    agg: Agg = "worst_case",
    score_type: ScoreType | None = None,
    min_group_size: int | None = None,
    protected: Sequence[str] | None = None,
    declared_groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Audit in-memory arrays; returns exactly the object ``audit --json`` writes (minus gates).

    ``fit`` uses it for its before/after report, so re-auditing a shipped checkpoint with
    the CLI reproduces the same numbers. The score type is decided once for the whole array.
    """
    acc = FairnessAccumulator(
        threshold=threshold, score_type=score_type, method=method, agg=agg,
        min_group_size=min_group_size, protected=protected, declared_groups=declared_groups,
    )
    acc.update(y_true, y_score, groups, sample_weight)
    return acc.compute()


def _label_metric(
    key: str, y_true: Any, y_pred: Any, sensitive_features: Any, method: Method, sample_weight: Any, agg: Agg = "worst_case"
) -> float | None:
    acc = FairnessAccumulator(score_type="label", method=method, agg=agg, keep_scores=False)
    acc.update(y_true, y_pred, sensitive_features, sample_weight)
    return acc.compute()["metrics"][key]


def demographic_parity_difference(y_true: Any, y_pred: Any, *, sensitive_features: Any,
                                  method: Method = "between_groups", sample_weight: Any = None) -> float | None:
    """fairlearn's definition on hard predictions; None when fewer than two groups have rows."""
    return _label_metric("demographic_parity_difference", y_true, y_pred, sensitive_features, method, sample_weight)


def demographic_parity_ratio(y_true: Any, y_pred: Any, *, sensitive_features: Any,
                             method: Method = "between_groups", sample_weight: Any = None) -> float | None:
    """fairlearn's definition; None also when no group selects anyone (0/0)."""
    return _label_metric("demographic_parity_ratio", y_true, y_pred, sensitive_features, method, sample_weight)


def equal_opportunity_difference(y_true: Any, y_pred: Any, *, sensitive_features: Any,
                                 method: Method = "between_groups", sample_weight: Any = None) -> float | None:
    """TPR gap over the groups that have positives; None when fewer than two do."""
    return _label_metric("equal_opportunity_difference", y_true, y_pred, sensitive_features, method, sample_weight)


def equal_opportunity_ratio(y_true: Any, y_pred: Any, *, sensitive_features: Any,
                            method: Method = "between_groups", sample_weight: Any = None) -> float | None:
    """TPR ratio over the groups that have positives."""
    return _label_metric("equal_opportunity_ratio", y_true, y_pred, sensitive_features, method, sample_weight)


def equalized_odds_difference(y_true: Any, y_pred: Any, *, sensitive_features: Any, method: Method = "between_groups",
                              sample_weight: Any = None, agg: Agg = "worst_case") -> float | None:
    """max (``worst_case``) or mean of the TPR and FPR gaps; None when either is undefined."""
    return _label_metric("equalized_odds_difference", y_true, y_pred, sensitive_features, method, sample_weight, agg)


def equalized_odds_ratio(y_true: Any, y_pred: Any, *, sensitive_features: Any, method: Method = "between_groups",
                         sample_weight: Any = None, agg: Agg = "worst_case") -> float | None:
    """min (``worst_case``) or mean of the TPR and FPR ratios; None when either is undefined."""
    return _label_metric("equalized_odds_ratio", y_true, y_pred, sensitive_features, method, sample_weight, agg)
