"""``python -m astages``: the ``astages`` command."""

from astages.cli import main

main(prog_name="astages")
