"""Run one benchmark worker: ``python -m benchmarks.worker plain|astages|lean``.

``plain`` and ``astages`` run arq's own Worker (plain functions, or astages' settings);
``lean`` runs ``astages worker``'s HardenedWorker with astages' settings.

The ``arq`` CLI would do (``arq benchmarks.settings.ASTAGES``), but it logs two lines per
job at INFO; this runner logs warnings only, so the figures measure the queue and not the
log handler (the logging cost is the same for both sides).
"""

from __future__ import annotations

import logging
import sys

from arq.worker import run_worker

from astages import runner
from benchmarks import settings


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kind = sys.argv[1]
    if kind == "lean":
        runner.run_worker(settings.ASTAGES)
    else:
        run_worker(settings.ASTAGES if kind == "astages" else settings.PLAIN)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
