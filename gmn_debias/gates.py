"""Release gates: thresholds on audit metrics → pass / fail / undefined → an exit code.

A gated metric that is undefined (e.g. one group only) is neither pass nor fail: by
default it exits 3 so CI notices that the check could not be made; ``on_undefined``
"pass" or "fail" turns it into a decision. A definite failure (exit 1) wins over an
undefined gate (exit 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_UNDEFINED, UserError

OnUndefined = Literal["error", "pass", "fail"]
ON_UNDEFINED: tuple[str, ...] = ("error", "pass", "fail")

#: gate name (the CLI flag without dashes) → (metric key in the audit object, bound kind)
GATES: dict[str, tuple[str, Literal["max", "min"]]] = {
    "max_dp": ("demographic_parity_difference", "max"),
    "min_dp_ratio": ("demographic_parity_ratio", "min"),
    "max_eo": ("equal_opportunity_difference", "max"),
    "max_eod": ("equalized_odds_difference", "max"),
    "min_eod_ratio": ("equalized_odds_ratio", "min"),
    "max_score_gap": ("mean_score_difference", "max"),
    "min_accuracy": ("accuracy", "min"),
    "min_ap": ("average_precision", "min"),
    "min_auc": ("roc_auc", "min"),
}


@dataclass(frozen=True)
class Gate:
    """One threshold: ``metric <= bound`` (kind "max") or ``metric >= bound`` (kind "min")."""

    name: str
    metric: str
    kind: Literal["max", "min"]
    bound: float

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate; ``status`` is "pass", "fail" or "undefined"."""

    gate: Gate
    value: float | None
    status: Literal["pass", "fail", "undefined"]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        g = self.gate
        return {"name": g.name, "flag": g.flag, "metric": g.metric, "kind": g.kind, "bound": g.bound,
                "value": self.value, "status": self.status, "reason": self.reason}


def build_gates(bounds: dict[str, float | None]) -> list[Gate]:
    """Gates for the bounds that are set (``{"max_dp": 0.1, "min_ap": None}`` → one gate)."""
    gates = []
    for name, bound in bounds.items():
        if bound is None:
            continue
        if name not in GATES:
            raise UserError(f"unknown gate {name!r}; known: {', '.join(GATES)}")
        metric, kind = GATES[name]
        if not 0.0 <= bound <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must lie in [0, 1], got {bound}")
        gates.append(Gate(name, metric, kind, float(bound)))
    return gates


def evaluate_gates(audit: dict[str, Any], gates: list[Gate], on_undefined: OnUndefined = "error") -> list[GateResult]:
    """Check every gate against an audit object (see :func:`gmn_debias.metrics.audit_arrays`)."""
    if on_undefined not in ON_UNDEFINED:
        raise UserError(f"--on-undefined must be one of {', '.join(ON_UNDEFINED)}, got {on_undefined!r}")
    results = []
    for gate in gates:
        value = audit["metrics"].get(gate.metric)
        if value is None:
            why = audit.get("undefined", {}).get(gate.metric, "not computed")
            status: Literal["pass", "fail", "undefined"] = "undefined" if on_undefined == "error" else on_undefined
            reason = f"{gate.metric} is undefined ({why})"
            if on_undefined != "error":
                reason += f"; --on-undefined {on_undefined}"
        else:
            ok = value <= gate.bound if gate.kind == "max" else value >= gate.bound
            status = "pass" if ok else "fail"
            op = ("<=" if ok else ">") if gate.kind == "max" else (">=" if ok else "<")
            reason = f"{gate.metric} = {value:.4f} {op} {gate.bound:g}"
        results.append(GateResult(gate, value, status, reason))
    return results


def exit_code(results: list[GateResult]) -> int:
    """1 if any gate failed, else 3 if any is undefined, else 0."""
    statuses = {r.status for r in results}
    if "fail" in statuses:
        return EXIT_GATE_FAILED
    if "undefined" in statuses:
        return EXIT_UNDEFINED
    return EXIT_OK
