"""What the reliability suite did, summed over a run: printed at the end of pytest's output.

Tests add to :data:`REPORT` (``REPORT["SIGKILL trials, local"] += 1``); the suite's
conftest prints the totals in pytest's terminal summary, and writes them as JSON to the
path in ``TIERSTORE_RELIABILITY_REPORT`` when that is set.
"""

from __future__ import annotations

import collections

REPORT: collections.Counter = collections.Counter()
