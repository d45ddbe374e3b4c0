"""Render an audit: a table for the terminal, the JSON document, Markdown, JUnit XML.

The JSON document is the audit object (:func:`gmn_debias.metrics.audit_arrays`) plus a
``gates`` block; JUnit has one testcase per gate so any CI shows which gate failed.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from .gates import GateResult, exit_code

GROUP_COLUMNS = (("count", "count"), ("selection_rate", "sel. rate"), ("true_positive_rate", "TPR"),
                 ("false_positive_rate", "FPR"), ("accuracy", "accuracy"), ("mean_score", "mean score"))
HEADLINE = ("demographic_parity_difference", "demographic_parity_ratio", "equal_opportunity_difference",
            "equalized_odds_difference", "equalized_odds_ratio", "mean_score_difference",
            "mean_score_equalized_odds", "accuracy", "average_precision", "roc_auc")


def fmt(value: Any, digits: int = 4) -> str:
    """A number for humans; None is spelled 'undefined', never 0."""
    if value is None:
        return "undefined"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def audit_document(audit: dict[str, Any], results: list[GateResult], on_undefined: str) -> dict[str, Any]:
    """The ``--json`` object: the audit plus gate outcomes and the exit code they imply."""
    return {**audit, "gates": {"on_undefined": on_undefined, "exit_code": exit_code(results),
                               "results": [r.to_dict() for r in results]}}


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def _describe(audit: dict[str, Any]) -> str:
    by = ", ".join(audit["protected"]) if audit.get("protected") else "the group column"
    threshold = "" if audit["threshold"] is None else f", threshold {audit['threshold']:g}"
    weighted = ", weighted" if audit["weighted"] else ""
    return (f"{audit['n_rows']} rows, {len(audit['groups'])} groups by {by} "
            f"({audit['score_type']} scores{threshold}{weighted}; method {audit['method']}, agg {audit['agg']})")


def _metric_note(audit: dict[str, Any], key: str) -> str:
    m = audit["metrics"]
    if key == "equalized_odds_difference":
        return f"TPR gap {fmt(m['true_positive_rate_difference'])}, FPR gap {fmt(m['false_positive_rate_difference'])}"
    if key == "equalized_odds_ratio":
        return f"TPR ratio {fmt(m['true_positive_rate_ratio'])}, FPR ratio {fmt(m['false_positive_rate_ratio'])}"
    if key == "mean_score_equalized_odds":
        return (f"Y=1 gap {fmt(m['mean_score_difference_positive'])} + "
                f"Y=0 gap {fmt(m['mean_score_difference_negative'])}")
    return audit["undefined"].get(key, "") if m.get(key) is None else ""


def _group_rows(audit: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, stats in [*audit["groups"].items(), ("(overall)", audit["overall"])]:
        flag = " (small)" if stats.get("small") else ""
        rows.append([name + flag, *(fmt(stats[key]) for key, _ in GROUP_COLUMNS)])
    return rows


def _aligned(header: list[str], rows: list[list[str]], text_last: bool = False) -> list[str]:
    """Plain-text columns: names left, numbers right (and a trailing note column left)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, len(header) - 1} if text_last else {0}

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _verdict(results: list[GateResult]) -> str:
    code = exit_code(results)
    if not results:
        return "no gates set (exit 0)"
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "undefined")}
    # Worded so a CI log scanner never mistakes it for a test runner's "N passed, N failed" line.
    return (f"gates pass {counts['pass']}/{len(results)}, fail {counts['fail']}, "
            f"undefined {counts['undefined']} (exit {code})")


def render_table(audit: dict[str, Any], results: list[GateResult]) -> str:
    """The human summary printed on stdout."""
    lines = [f"audit: {_describe(audit)}", ""]
    lines += _aligned(["group", *(h for _, h in GROUP_COLUMNS)], _group_rows(audit))
    lines.append("")
    metric_rows = [[key, fmt(audit["metrics"].get(key)), _metric_note(audit, key)] for key in HEADLINE]
    lines += _aligned(["metric", "value", ""], metric_rows, text_last=True)
    if audit["small_groups"]:
        lines += ["", f"small groups (< {audit['min_group_size']} rows): {', '.join(audit['small_groups'])}"]
    if results:
        lines += ["", "gates:"]
        lines += [f"  {r.status.upper():9} {r.gate.flag} {r.gate.bound:g}: {r.reason}" for r in results]
    lines += ["", f"result: {_verdict(results)}"]
    return "\n".join(lines) + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731  (intersectional labels use '|')
    return ["| " + " | ".join(esc(c) for c in header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)]


def render_markdown(audit: dict[str, Any], results: list[GateResult]) -> str:
    """A Markdown report (for a CI job summary or a pull-request comment)."""
    lines = ["# gmn-debias audit", "", f"**{_verdict(results)}** — {_describe(audit)}", ""]
    if results:
        lines += ["## Gates", ""]
        lines += _md_table(["gate", "bound", "value", "status", "detail"],
                           [[r.gate.flag, f"{r.gate.bound:g}", fmt(r.value), r.status, r.reason] for r in results])
        lines.append("")
    lines += ["## Metrics", ""]
    lines += _md_table(["metric", "value", "note"],
                       [[k, fmt(audit["metrics"].get(k)), _metric_note(audit, k)] for k in HEADLINE])
    lines += ["", "## Groups", ""]
    lines += _md_table(["group", *(h for _, h in GROUP_COLUMNS)], _group_rows(audit))
    undefined = [f"- `{k}`: {why}" for k, why in audit["undefined"].items()]
    if undefined:
        lines += ["", "## Undefined", "", *undefined]
    return "\n".join(lines) + "\n"


def render_junit(audit: dict[str, Any], results: list[GateResult]) -> str:
    """JUnit XML: one testcase per gate; a failed gate is a failure, an undefined one an error."""
    failures = sum(r.status == "fail" for r in results)
    errors = sum(r.status == "undefined" for r in results)
    attrs = {"name": "gmn-debias audit", "tests": str(len(results)), "failures": str(failures), "errors": str(errors)}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", {**attrs, "skipped": "0"})
    props = ET.SubElement(suite, "properties")
    for key in ("n_rows", "method", "agg", "threshold", "score_type"):
        ET.SubElement(props, "property", {"name": key, "value": str(audit[key])})
    for r in results:
        case = ET.SubElement(suite, "testcase", {"classname": "gmn_debias.audit.gates", "name": f"{r.gate.name} ({r.gate.metric})", "time": "0"})
        if r.status == "fail":
            ET.SubElement(case, "failure", {"type": "GateFailed", "message": r.reason}).text = r.reason
        elif r.status == "undefined":
            ET.SubElement(case, "error", {"type": "UndefinedMetric", "message": r.reason}).text = r.reason
        else:
            ET.SubElement(case, "system-out").text = r.reason
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
