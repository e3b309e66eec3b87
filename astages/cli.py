"""The ``astages`` command."""

from __future__ import annotations

import click

from astages import __version__


@click.group()
@click.version_option(__version__, prog_name="astages")
def main() -> None:
    """Run and inspect staged arq job groups."""
