"""The lost-reply suite's figures in the terminal summary."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    module = sys.modules.get("test_lost_replies")
    faults = getattr(module, "FAULTS", None)
    if faults:
        terminalreporter.write_line(
            f"lost-reply faults injected: {sum(faults.values())} over {len(faults)} mutating calls"
        )
