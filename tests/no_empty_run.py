"""Pytest hook: a session in which no test passed is a failure, also when every test was
skipped (pytest itself exits 0 then, and only an empty collection exits 5). tests/conftest.py
imports the hook, so `python -m pytest -q -n auto` (README and .ci/run) gets it; a CI machine that lost a
dependency and skips everything must not look green."""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller decides
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or session.config.option.collectonly or exitstatus != pytest.ExitCode.OK:
        return
    if reporter.stats.get("passed"):
        return
    skipped = len(reporter.stats.get("skipped", []))
    reporter.write_line(f"error: no test passed ({skipped} skipped); a run in which no test "
                        "ran is a failure", red=True, bold=True)
    session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
