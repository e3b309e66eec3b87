"""The ``astages`` command."""

from __future__ import annotations

import click

from astages import __version__


@click.group()
@click.version_option(__version__, prog_name="astages")
def main() -> None:
    """Run and inspect staged arq job groups."""


@main.command("worker")
@click.argument("worker-settings", type=str, required=True)
@click.option("--burst/--no-burst", default=None, help="Batch mode: exit once no jobs are found in any queue.")
@click.option("--check", is_flag=True, help="Health Check: run a health check and exit.")
@click.option(
    "--watch",
    type=click.Path(exists=True, dir_okay=True, file_okay=False),
    help="Watch a directory and reload the worker upon changes.",
)
@click.option("-v", "--verbose", is_flag=True, help="Enable verbose output.")
@click.option("--custom-log-dict", type=str, help="Import path for a dictionary in logdict form, to configure logging.")
def worker(
    *,
    worker_settings: str,
    burst: bool | None,
    check: bool,
    watch: str | None,
    verbose: bool,
    custom_log_dict: str | None,
) -> None:
    """Run an arq worker that survives dropped Redis connections (the options of arq's CLI).

    WORKER_SETTINGS is the import path of the settings, e.g. app.WorkerSettings (a class
    or the dict astages.worker_settings returns)."""
    from astages.runner import main as run

    code = run(worker_settings, burst=burst, check=check, watch=watch, verbose=verbose, custom_log_dict=custom_log_dict)
    raise SystemExit(code)
