"""pytest hooks that keep infrastructure failures apart from verdicts and leave nothing behind
(registered by ``harness.pytest_plugin`` through ``pytest_plugins``).

One mechanism for every infrastructure failure (an ``InfraError`` in any phase, a crashed xdist
worker): the report is marked with the stage that broke (``report.infra_stage``), counted as an
error in the terminal ("ERROR at call of ..." when it happened in the call), and carried into JUnit
as an ``infra_stage`` property on an ``<error>`` element, never a ``<failure>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .errors import InfraError

INFRA_PROPERTY = "infra_stage"
_seen: dict[str, tuple[str, str]] = {}      # nodeid -> (stage, phase) of infrastructure errors seen


def pytest_configure(config: pytest.Config) -> None:
    _seen.clear()


def mark_infra(report: pytest.TestReport, stage: str) -> None:
    """Mark ``report`` as an infrastructure error of ``stage`` (kept across xdist's serialisation)."""
    report.infra_stage = stage          # type: ignore[attr-defined]
    if (INFRA_PROPERTY, stage) not in report.user_properties:
        report.user_properties.append((INFRA_PROPERTY, stage))
    report.sections.append(("vtx infrastructure error", f"stage: {stage}, during {report.when}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(InfraError):
        # Not a verdict on the behaviour under test: an error, reported in the phase it happened.
        stage = getattr(call.excinfo.value, "stage", "run")
        mark_infra(report, stage)
        if (INFRA_PROPERTY, stage) not in item.user_properties:
            item.user_properties.append((INFRA_PROPERTY, stage))   # the teardown report carries it too


@pytest.hookimpl(optionalhook=True)      # an xdist hook: pytest without xdist must still load this
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched) -> None:
    """xdist: the worker running ``crashitem`` died (a signal, an abort): an infrastructure error."""
    mark_infra(report, "worker-crash")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    stage = getattr(report, "infra_stage", None)
    if stage is not None and report.failed:
        _seen[report.nodeid] = (stage, report.when or "?")


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    if getattr(report, "infra_stage", None) is not None and report.failed:
        return "error", "E", ("ERROR", {"red": True})
    return None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After junitxml has written its file: infrastructure errors become <error> elements."""
    xmlpath = getattr(session.config.option, "xmlpath", None)
    if not xmlpath or hasattr(session.config, "workerinput") or not _seen:
        return
    try:
        rewrite_junit(Path(xmlpath), dict(_seen))
    except (OSError, ET.ParseError) as e:
        session.config.issue_config_time_warning(
            pytest.PytestWarning(f"vtx: could not mark infrastructure errors in {xmlpath}: {e}"), stacklevel=2)


def rewrite_junit(path: Path, infra: dict[str, tuple[str, str]]) -> None:
    """Turn the <failure> of each infrastructure-error test case into an <error> naming its stage,
    and give the case an ``infra_stage`` property."""
    from _pytest.junitxml import mangle_test_address

    wanted = {}
    for nodeid, (stage, when) in infra.items():
        names = mangle_test_address(nodeid)
        wanted[(".".join(names[:-1]), names[-1])] = (stage, when)
    tree = ET.parse(path)
    for case in tree.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        if key not in wanted:
            continue
        stage, when = wanted[key]
        for failure in case.findall("failure"):
            error = ET.Element("error", {"message": f"infrastructure error at {stage} (during {when}): "
                                                    + failure.get("message", "")})
            error.text = failure.text
            case.insert(list(case).index(failure), error)
            case.remove(failure)
        props = case.find("properties")
        if props is None:
            props = ET.Element("properties")
            case.insert(0, props)
        if not any(p.get("name") == INFRA_PROPERTY for p in props):
            ET.SubElement(props, "property", {"name": INFRA_PROPERTY, "value": stage})
    for suite in tree.iter("testsuite"):
        cases = list(suite.iter("testcase"))
        suite.set("errors", str(sum(len(c.findall("error")) for c in cases)))
        suite.set("failures", str(sum(len(c.findall("failure")) for c in cases)))
    tree.write(path, encoding="utf-8", xml_declaration=True)
