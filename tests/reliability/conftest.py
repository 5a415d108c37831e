"""The reliability suite's run summary (see :mod:`._report`)."""

from __future__ import annotations

import json
import os

from ._report import REPORT


def pytest_terminal_summary(terminalreporter) -> None:
    if not REPORT:
        return
    terminalreporter.section("reliability")
    for name, value in sorted(REPORT.items()):
        terminalreporter.write_line(f"{name}: {value}")
    path = os.environ.get("TIERSTORE_RELIABILITY_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(dict(sorted(REPORT.items())), out, indent=2)
