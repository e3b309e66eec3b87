"""``astages metrics``: a stand-alone Prometheus exporter (the metrics extra)."""

from __future__ import annotations

import signal
from typing import Any, NoReturn

import click
from redis.exceptions import RedisError

from astages._connection import safe_url
from astages.cli import CommandError, main, redis_options

DEFAULT_PORT = 9484


def _interrupt(*_: Any) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM stops the exporter as Ctrl-C does (the server shut down, Redis closed)


@main.command("metrics")
@redis_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True, help="Port (0: any).")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    default=("arq:queue",),
    show_default=True,
    help="arq queue to report besides those the live groups' stages use; repeatable.",
)
@click.option(
    "--stage-series",
    type=click.IntRange(0, 100_000),
    default=200,
    show_default=True,
    help="At most this many stages (of pending and running groups) get per-stage series.",
)
def metrics(redis_url: str, prefix: str, host: str, port: int, queues: tuple[str, ...], stage_series: int) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics (needs the metrics extra: pip
    install 'astages[metrics]'). Each scrape reads Redis (O(groups), never a job list); the
    dashboard serves the same metrics at /metrics. Metrics carry no job data but group ids
    and stage names: listen beyond loopback only on a network you trust."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server

        from astages.metrics import AstagesCollector
    except ImportError as e:
        raise CommandError(
            "the exporter needs the metrics extra: pip install 'astages[metrics]' "
            f"(in a clone: pip install -e '.[metrics]') ({e})"
        ) from None
    where = safe_url(redis_url)
    try:
        collector = AstagesCollector(redis_url, prefix=prefix, queues=queues, stage_series=stage_series)
    except ValueError as e:
        raise CommandError(str(e)) from None
    except (RedisError, OSError, TimeoutError) as e:
        raise CommandError(f"cannot reach Redis at {where}: {e}") from None
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise CommandError(f"cannot listen on {host}:{port}: {e}") from None
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"astages metrics on http://{shown}:{server.server_port}/metrics (Redis {where})", err=True)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while thread.is_alive():
                thread.join(0.5)
        except KeyboardInterrupt:
            click.echo("stopped", err=True)
        finally:
            server.shutdown()
    finally:
        collector.close()
