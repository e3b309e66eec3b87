"""astages demo through click's runner, and the progress bars it draws."""

from __future__ import annotations

import io
import json
import logging

from cli_helpers import db_url_fixture  # noqa: F401 - the db_url fixture
from click.testing import CliRunner

from astages._board import Board, StageRow, bar, finished
from astages.cli import main
from astages.models import StageProgress


def test_demo_json_summary_on_fakeredis() -> None:
    """demo --json (no URL) reports per stage jobs, successful, failed, retried and duration."""
    result = CliRunner().invoke(main, ["demo", "--quick", "--photos", "12", "--json"], env={"REDIS_URL": None})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["redis"] == "fakeredis (in memory)"
    assert [s["jobs"] for s in data["stages"]] == [12, 12, 2, 1]
    assert [s["failed"] for s in data["stages"]] == [1, 0, 0, 0]
    assert data["stages"][0]["retried"] == 1  # photo 3 is busy once
    assert all(s["duration"] >= 0 for s in data["stages"])
    assert data["failures"][0]["error"] == "PhotoMissing: photo 11: the source answered 404"
    assert data["left_over_keys"] == 0


def test_demo_uses_redis_url_from_the_environment(db_url: str) -> None:
    """demo picks REDIS_URL up and says where it runs; the worker logs stay quiet."""
    logger = logging.getLogger("arq")
    before = (list(logger.handlers), logger.propagate)
    result = CliRunner().invoke(main, ["demo", "--quick", "--photos", "5"], env={"REDIS_URL": db_url})
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"astages demo: importing 5 photos in 4 stages on {db_url}\ngroup ")
    assert "Traceback" not in result.output
    assert (list(logger.handlers), logger.propagate) == before  # logging is restored


def test_demo_rejects_zero_photos() -> None:
    """A bad option is a usage error, not a traceback."""
    result = CliRunner().invoke(main, ["demo", "--photos", "0"], env={"REDIS_URL": None})
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_live_board_redraws_in_place() -> None:
    """On a terminal the bars are redrawn over the previous frame."""
    stream = io.StringIO()
    board = Board(stream, live=True, color=False)
    rows = [StageRow(1, "running", StageProgress(queued=3, successful=1), "fetch"), StageRow(2, "pending", None)]
    board.draw(rows)
    board.draw(finished(rows))
    first, second = stream.getvalue().split("\x1b[2F")
    assert first.count("\n") == 2 and "1/4" in first
    assert second.count("\x1b[2K") == 2 and "done (group finished)" in second


def test_piped_board_prints_a_line_per_stage_change() -> None:
    """Off a terminal a stage is printed when it starts and when it completes, not every frame."""
    stream = io.StringIO()
    board = Board(stream, live=False)
    running = [StageRow(1, "running", StageProgress(queued=2))]
    board.draw(running)
    board.draw(running)
    board.draw([StageRow(1, "complete", StageProgress(successful=1, failed=1, retried=3))])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("0/2  ✓0 ✗0 ↻0  running") or lines[0].endswith("0/2  ok 0 failed 0 retried 0  running")
    assert "2/2" in lines[1] and lines[1].endswith("complete")


def test_bar_widths() -> None:
    """A bar is always as wide as asked, filled in proportion."""
    assert bar(0, 10, 10) == "░" * 10
    assert bar(5, 10, 10) == "█" * 5 + "░" * 5
    assert bar(0, 0, 4) == "████"  # an empty stage is complete
    assert len(bar(7, 3, 6)) == 6
