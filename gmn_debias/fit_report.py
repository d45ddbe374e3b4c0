"""The ``fit`` report: before vs after on held-out rows, the candidates, and provenance.

``before`` and ``after`` are audit objects in the ``audit --json`` layout, so a reviewer
can audit the shipped checkpoint and compare. The Markdown opens with a one-line verdict.
"""

from __future__ import annotations

from typing import Any

from .report import fmt

SHORT = {
    "demographic_parity_difference": "DP gap",
    "equal_opportunity_difference": "EO gap",
    "equalized_odds_difference": "EOD",
    "average_precision": "AP",
    "selection_rate": "selection rate",
}
TARGET_NAME = {"dp": "DP gap", "eo": "EO gap", "eod": "EOD"}


def _fmt(value: Any) -> str:
    return fmt(value, digits=3)


def metric_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """after − before for every numeric metric (None where either side is undefined)."""
    out: dict[str, float | None] = {}
    for key, b in before["metrics"].items():
        a = after["metrics"].get(key)
        numeric = isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
        out[key] = float(a) - float(b) if numeric else None
    return out


def verdict(report: dict[str, Any]) -> str:
    """'DP gap 0.195 → 0.070, EOD …, AP …, selection rate …': the targeted gap first."""
    target_key = report["target"]["metric"]
    keys = [target_key] + [k for k in ("demographic_parity_difference", "equalized_odds_difference") if k != target_key]
    parts = [
        f"{SHORT[k]} {_fmt(report['before']['metrics'].get(k))} → {_fmt(report['after']['metrics'].get(k))}"
        for k in keys + ["average_precision", "selection_rate"]
    ]
    return ", ".join(parts)


def levelling_sentence(report: dict[str, Any]) -> str | None:
    """Say so when much of a DP drop comes from selecting fewer people overall."""
    matched = report.get("at_input_selection_rate")
    before, after = report["before"]["metrics"], report["after"]["metrics"]
    if matched is None or not before.get("selection_rate") or after.get("selection_rate") is None:
        return None
    drop = 1.0 - after["selection_rate"] / before["selection_rate"]
    if drop < 0.2:
        return None
    return (
        f"Caution: the model now selects {drop:.0%} fewer people overall (selection rate "
        f"{before['selection_rate']:.3f} → {after['selection_rate']:.3f}). At the input model's selection rate "
        f"(threshold {matched['threshold']:.3f}) the DP gap is {_fmt(matched['metrics']['demographic_parity_difference'])} "
        f"and the EO gap {_fmt(matched['metrics']['equal_opportunity_difference'])}: the rest of the DP drop is "
        "levelling down, not groups being treated more alike."
    )


def selection_sentence(report: dict[str, Any]) -> str:
    """Plain words on what was chosen and whether the targeted gap was halved."""
    sel = report["selection"]
    name = TARGET_NAME[report["target"]["name"]]
    budget = report["target"]["max_ap_drop"]
    if sel["status"] == "kept_original":
        text = (
            f"No candidate lowered the validation {name} while keeping AP within {budget:g} of the "
            "input model's, so the output keeps the input model's behaviour (use --force to take the "
            "smallest gap regardless of AP)."
        )
    else:
        how = "chosen" if sel["status"] == "selected" else "forced (AP budget not met)"
        text = f"Candidate {how}: {sel['setting_text']}, epoch {sel['epoch']}."
    if not report["halved"]:
        text += f" The targeted {name} could not be halved within the budget on the evaluation rows."
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The reviewer's page: verdict first, then tables."""
    before, after, change = report["before"], report["after"], report["change"]
    ev = report["evaluated_on"]
    where = f"{ev['path']} ({ev['rows']} rows)" if ev["source"] == "eval" else (
        f"the validation part of the fine-tuning data ({ev['rows']} rows; no --eval file was given)"
    )
    lines = [
        "# gmn-debias fit report",
        "",
        f"**Verdict:** {report['verdict']} — measured on {where}.",
        "",
        selection_sentence(report),
        "",
        *([levelling_sentence(report), ""] if levelling_sentence(report) else []),
        "## Before and after",
        "",
    ]
    metric_rows = [
        [key, _fmt(before["metrics"][key]), _fmt(after["metrics"].get(key)),
         "" if change.get(key) is None else f"{change[key]:+.3f}"]
        for key in before["metrics"]
        if not isinstance(before["metrics"][key], (dict, list))
    ]
    lines += _table(["metric", "before", "after", "change"], metric_rows)
    matched = report.get("at_input_selection_rate")
    if matched is not None:
        lines += ["", f"At the input model's selection rate ({matched['selection_rate']:.3f}; threshold "
                  f"{matched['threshold']:.3f} for the debiased model):", ""]
        lines += _table(["metric", "before", "after (matched rate)"], [
            [k, _fmt(before["metrics"][k]), _fmt(v)] for k, v in matched["metrics"].items()])
    lines += ["", "## Per group", ""]
    group_rows = []
    for name, g in before["groups"].items():
        a = after["groups"].get(name, {})
        group_rows.append([
            name, _fmt(g.get("count")),
            f"{_fmt(g.get('selection_rate'))} → {_fmt(a.get('selection_rate'))}",
            f"{_fmt(g.get('true_positive_rate'))} → {_fmt(a.get('true_positive_rate'))}",
            f"{_fmt(g.get('false_positive_rate'))} → {_fmt(a.get('false_positive_rate'))}",
        ])
    lines += _table(["group", "n", "selection rate", "TPR", "FPR"], group_rows)
    lines += ["", "## Candidates on validation data", "",
              f"Input model on validation: {_fmt(report['validation']['baseline'].get(report['target']['metric']))} "
              f"{TARGET_NAME[report['target']['name']]}, AP {_fmt(report['validation']['baseline'].get('average_precision'))}. "
              "The picked candidate is marked ✔.", ""]
    cand_rows = [
        [str(c["setting"]), str(c["epoch"]), _fmt(c["train_loss"]), _fmt(c["dp"]), _fmt(c["eo"]), _fmt(c["eod"]),
         _fmt(c["ap"]), "✔" if c["picked"] else ""]
        for c in report["validation"]["candidates"]
    ]
    lines += _table(["setting", "epoch", "train loss", "DP gap", "EO gap", "EOD", "AP", "picked"], cand_rows)
    lines += ["", "Settings:", ""]
    lines += [f"{i}. {text}" for i, text in enumerate(report["settings"])]
    fold = report["fold_check"]
    lines += ["", "## Folding", ""]
    lines.append(
        f"GroupMixNorm was folded into the weights; the folded model reproduces the hooked model on "
        f"{fold['rows_checked']} rows (max score difference {fold['max_abs_score_diff']:.2e}, "
        f"{fold['prediction_flips']} prediction flips). The checkpoint needs no gmn-debias at inference."
        if fold["folded"] else "Nothing was folded: the output has the input model's weights."
    )
    lines += ["", "## Provenance", ""]
    lines += [f"- {key}: {value}" for key, value in report["provenance"].items()]
    lines += ["", f"Checkpoint: `{report['checkpoint']}`", ""]
    return "\n".join(lines)


def candidate_rows(candidates: list[dict[str, Any]], picked: tuple[int, int] | None) -> list[dict[str, Any]]:
    """Flatten each candidate's validation audit to the figures the table shows."""
    rows = []
    for c in candidates:
        m = c["metrics"]["metrics"]
        rows.append({
            "setting": c["setting"], "epoch": c["epoch"], "train_loss": c["train_loss"],
            "dp": m.get("demographic_parity_difference"), "eo": m.get("equal_opportunity_difference"),
            "eod": m.get("equalized_odds_difference"), "ap": m.get("average_precision"),
            "picked": picked == (c["setting"], c["epoch"]),
        })
    return rows
