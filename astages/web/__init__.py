"""The astages dashboard: ``create_app(redis)`` is an ASGI app (Starlette, Jinja2) showing
groups, stages and jobs, with the original's buttons, a JSON API under ``/api`` and live
figures. Needs the ``web`` extra: ``pip install 'astages[web]'``."""

from astages.web.app import Dashboard, create_app

__all__ = ["Dashboard", "create_app"]
