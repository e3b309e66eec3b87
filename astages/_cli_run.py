"""``astages worker``, ``demo`` and ``web``: commands that run something (a worker, the demo, the dashboard)."""

from __future__ import annotations

import click

from astages._board import Board
from astages._connection import safe_url
from astages.cli import (
    CommandError,
    echo_json,
    json_option,
    main,
    plural,
    redis_options,
    run_async,
    stages_table,
)
from astages.group import StagedGroup

# -- astages worker ----------------------------------------------------------------------


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


# -- astages demo ------------------------------------------------------------------------


@main.command()
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=None,
    show_envvar=True,
    help="Redis server to run on (default: an in-memory fakeredis server).",
)
@click.option("--photos", type=click.IntRange(1, 100_000), default=200, show_default=True, help="Photos to import.")
@click.option("--quick", is_flag=True, help="No simulated work and no real waiting for retries (for CI).")
@click.option("--verbose", is_flag=True, help="Show the worker's log.")
@json_option
def demo(redis_url: str | None, photos: int, quick: bool, verbose: bool, as_json: bool) -> None:
    """Run a photo import in four stages, with a worker in this process.

    Some jobs retry with arq's Retry and one fails; live progress bars per stage, then a
    summary per stage. Needs no Redis server."""
    from astages.demo import STAGES, quiet_workers, run_demo

    where = safe_url(redis_url) if redis_url else "fakeredis (in memory)"
    board = None if as_json else Board()
    if not as_json:
        click.echo(f"astages demo: importing {plural(photos, 'photo')} in {plural(len(STAGES), 'stage')} on {where}")

    def announce(group: StagedGroup) -> None:
        if not as_json and redis_url:
            # the same server for the suggested command (a password stays out of the terminal)
            url = "$REDIS_URL" if "@" in redis_url else redis_url
            click.echo(f"group {group.id} (try `astages watch --redis-url {url} {group.id[:12]}` in another terminal)")

    with quiet_workers(verbose):
        result = run_async(run_demo(redis_url, photos=photos, quick=quick, board=board, on_group=announce), redis_url)
    if as_json:
        echo_json(result.as_dict())
        return
    data = result.as_dict()
    click.echo()
    click.echo(stages_table(data["stages"], number="stage", label="name"))
    click.echo()
    failures = "; ".join(f["error"] for f in data["failures"]) or "none"
    cancelled = f", {data['cancelled']} cancelled" if data["cancelled"] else ""
    click.echo(
        f"{plural(data['jobs'], 'job')} in {data['elapsed']:.1f}s: {data['successful']} successful, "
        f"{data['failed']} failed ({failures}){cancelled}, {plural(data['retried'], 'retry', 'retries')}."
    )
    report = result.run.stage(4)
    if report:
        click.echo(f"report: {report[0].message}")
    ended = f"ended {data['outcome']} and" if data["outcome"] else "finished and"
    click.echo(f"The group {ended} deleted itself ({plural(data['left_over_keys'], 'key')} left).")


# -- astages web -------------------------------------------------------------------------


@main.command()
@redis_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback without a login).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--root-path", default="", help="Path prefix when a proxy serves the dashboard under a sub-path.")
@click.option(
    "--trusted-origin",
    "trusted_origins",
    multiple=True,
    help="Origin (https://ops.example.com) a reverse proxy that rewrites Host serves the pages from; repeatable.",
)
@click.option(
    "--queue",
    "queues",
    multiple=True,
    help="An arq queue the operations view always shows (besides arq:queue and the stages' queues); repeatable.",
)
def web(
    redis_url: str,
    prefix: str,
    host: str,
    port: int,
    root_path: str,
    trusted_origins: tuple[str, ...],
    queues: tuple[str, ...],
) -> None:
    """Serve the web dashboard (needs the web extra: pip install 'astages[web]', or
    pip install -e '.[web]' in a clone).

    Set ASTAGES_WEB_PASSWORD (user ASTAGES_WEB_USER, default astages) to require HTTP basic
    auth; an address that is not loopback needs it. ASTAGES_WEB_SECRET keeps forms valid
    across restarts. Behind a reverse proxy that rewrites the Host header, name the public
    origin with --trusted-origin (or ASTAGES_WEB_TRUSTED_ORIGINS), else its forms are
    refused as cross-site."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401

        from astages.web.serve import WebSettings, serve
    except ImportError as e:
        raise CommandError(
            f"the dashboard needs the web extra: pip install 'astages[web]' (in a clone: pip install -e '.[web]') ({e})"
        ) from None
    try:
        settings = WebSettings.of(
            redis_url, host, port, prefix, root_path, trusted_origins=trusted_origins, queues=queues
        )
    except ValueError as e:
        raise CommandError(str(e)) from None
    where = f"http://{host}:{port}{settings.root_path}/"
    click.echo(f"astages dashboard on {where} (Redis {safe_url(redis_url)})", err=True)
    run_async(serve(settings), redis_url)
