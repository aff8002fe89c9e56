"""A regression report for people and for CI systems: a plain-text table (CI logs), a Markdown summary (a
pull-request comment, a job summary) and JUnit XML (one test case per cell and metric, the delta in the
failure message). When the suite cannot run at all, ``error_markdown`` / ``error_junit`` say why in the
same places, so a CI page never shows a stale or missing report."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime, timezone

from .verdict import COULD_NOT_RUN, DRIFT, LABELS, Check, Report, _number

HEADERS = ["cell", "metric", "baseline", "now", "delta", "tolerance", "verdict"]
TITLES = {0: "passed", DRIFT: "DRIFT", COULD_NOT_RUN: "could not run"}


def _row(check: Check) -> list[str]:
    return [check.cell, check.metric, _number(check.baseline), _number(check.now), check.delta_text(),
            check.tolerance.text() if check.tolerance else "-", LABELS[check.status]]


def _shown(report: Report) -> list[Check]:
    """The checks worth a row: every one that did not pass, or all of them when all passed."""
    failing = [c for c in report.checks if c.status not in ("ok", "skipped")]
    return failing or report.with_status("ok")


def _reasons(report: Report) -> list[str]:
    """One line per cell that could not run or was refused its weights."""
    return list(dict.fromkeys(f"{check.cell}: {check.reason}" for check in report.with_status("error", "weights")))


def _footer(report: Report) -> str:
    cells = len(report.cells("ok", "drift", "new", "weights", "error"))  # the suite's cells, not gone or skipped ones
    return (f"{cells} cell{'s' if cells != 1 else ''}, {report.seconds:.0f} s; suite {report.suite}, "
            f"baselines {report.baselines}")


def text(report: Report) -> str:
    """Plain text (no wrapping: CI logs are read as text)."""
    from tabulate import tabulate

    lines = [tabulate([_row(c) for c in _shown(report)], headers=HEADERS, tablefmt="simple", disable_numparse=True)]
    lines += _reasons(report) + report.notes
    lines.append(f"regress: {report.verdict()} ({_footer(report)})")
    return "\n".join(lines)


def _md(value: str) -> str:
    return value.replace("|", "\\|")


def _md_table(checks: list[Check]) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|---|--:|--:|--:|---|---|"]
    return lines + ["| " + " | ".join(_md(f"`{v}`" if i == 0 else v) for i, v in enumerate(_row(c))) + " |"
                    for c in checks]


def markdown(report: Report, update_command: str) -> str:
    """A summary fit for a pull-request comment: the verdict, what failed, everything else folded away."""
    status = report.exit_status
    lines = [f"### ssl-bench regress: {TITLES[status]}", "", f"**{report.verdict()}** ({_md(_footer(report))})", ""]
    failing = [c for c in report.checks if c.status not in ("ok", "skipped")]
    if failing:
        lines += _md_table(failing) + [""]
    rest = [c for c in report.checks if c not in failing]
    if rest:
        summary = f"the other {len(rest)} checks" if failing else f"all {len(rest)} checks"
        lines += [f"<details><summary>{summary}</summary>", ""] + _md_table(rest) + ["", "</details>", ""]
    notes = [f"- {_md(line)}" for line in _reasons(report) + report.notes]
    lines += notes + ([""] if notes else [])
    if status == DRIFT:
        lines.append(f"If the change is intended: `{update_command}`, then commit the baselines.")
    return "\n".join(lines).rstrip("\n") + "\n"


def junit(report: Report) -> str:
    """JUnit XML: one test case per cell and metric (class name: the cell; name: the metric)."""
    counts = {"tests": len(report.checks), "failures": len(report.with_status("drift", "new", "gone", "weights")),
              "errors": len(report.with_status("error")), "skipped": len(report.with_status("skipped"))}
    root = ET.Element("testsuites", name="ssl-bench regress", time=f"{report.seconds:.3f}",
                      **{k: str(v) for k, v in counts.items()})
    suite = ET.SubElement(root, "testsuite", name=str(report.suite), time=f"{report.seconds:.3f}",
                          timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          **{k: str(v) for k, v in counts.items()})
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", name="baselines", value=str(report.baselines))
    for check in report.checks:
        case = ET.SubElement(suite, "testcase", classname=check.cell, name=check.metric, time="0")
        if check.status in ("drift", "new", "gone", "weights"):
            ET.SubElement(case, "failure", message=check.message(), type=check.status).text = check.message()
        elif check.status == "error":
            ET.SubElement(case, "error", message=check.message(), type="could not run").text = check.message()
        elif check.status == "skipped":
            ET.SubElement(case, "skipped", message=check.message())
    if report.notes:
        ET.SubElement(suite, "system-out").text = "\n".join(report.notes)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def error_junit(message: str) -> str:
    """The JUnit file of a suite that could not run at all: one test case, in error, saying why."""
    root = ET.Element("testsuites", name="ssl-bench regress", tests="1", failures="0", errors="1")
    suite = ET.SubElement(root, "testsuite", name="ssl-bench regress", tests="1", failures="0", errors="1")
    case = ET.SubElement(suite, "testcase", classname="ssl-bench regress", name="suite", time="0")
    ET.SubElement(case, "error", message=message, type="could not run").text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def error_markdown(message: str) -> str:
    return f"### ssl-bench regress: could not run\n\n{_md(message)}\n"
