"""``astages web``: serve the dashboard with uvicorn, safely by default.

It listens on 127.0.0.1 unless told otherwise. ``ASTAGES_WEB_PASSWORD`` (and optionally
``ASTAGES_WEB_USER``, default ``astages``) turns on HTTP basic auth, and any address that is
not loopback refuses to start without it. ``ASTAGES_WEB_SECRET`` keeps CSRF tokens valid
across restarts and between processes behind one load balancer.
``ASTAGES_WEB_TRUSTED_ORIGINS`` (comma-separated, or ``--trusted-origin``) names the origins
a reverse proxy that rewrites ``Host`` serves the pages from.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from astages._keys import DEFAULT_PREFIX
from astages.web.security import normal_origin

USER_ENV = "ASTAGES_WEB_USER"
PASSWORD_ENV = "ASTAGES_WEB_PASSWORD"
SECRET_ENV = "ASTAGES_WEB_SECRET"
TRUSTED_ORIGINS_ENV = "ASTAGES_WEB_TRUSTED_ORIGINS"
DEFAULT_USER = "astages"


class UnsafeBind(ValueError):
    """Listening beyond this machine without a login."""

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(
            f"refusing to serve the dashboard on {host} without a login: set {PASSWORD_ENV} "
            f"(and {USER_ENV}, default {DEFAULT_USER!r}), or listen on 127.0.0.1 behind your own proxy"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class WebSettings:
    """What ``astages web`` was asked for, with the login read from the environment."""

    redis_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    prefix: str = DEFAULT_PREFIX
    root_path: str = ""
    login: tuple[str, str] | None = None
    secret: bytes | None = None
    trusted_origins: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()  # arq queues the operations view always shows

    @classmethod
    def of(
        cls,
        redis_url: str,
        host: str,
        port: int,
        prefix: str = DEFAULT_PREFIX,
        root_path: str = "",
        environ: Mapping[str, str] | None = None,
        trusted_origins: tuple[str, ...] = (),
        queues: tuple[str, ...] = (),
    ) -> WebSettings:
        """Settings from the options and ``environ``; UnsafeBind when a non-loopback
        address would be served without a password."""
        env = os.environ if environ is None else environ
        password = env.get(PASSWORD_ENV) or None
        login = (env.get(USER_ENV) or DEFAULT_USER, password) if password else None
        if login is None and not is_loopback(host):
            raise UnsafeBind(host)
        secret = env.get(SECRET_ENV)
        origins = list(trusted_origins) + [o for o in (env.get(TRUSTED_ORIGINS_ENV) or "").split(",") if o.strip()]
        normal = tuple(normal_origin(o) for o in origins)  # ValueError names a bad one
        return cls(
            redis_url,
            host,
            port,
            prefix,
            root_path.rstrip("/"),
            login,
            secret.encode() if secret else None,
            normal,
            tuple(queues),
        )


async def serve(settings: WebSettings) -> None:
    """Connect to Redis and serve the dashboard until interrupted."""
    import uvicorn

    from astages._connection import connect
    from astages.web.app import create_app

    redis = await connect(settings.redis_url)
    try:
        app = create_app(
            redis,
            prefix=settings.prefix,
            login=settings.login,
            secret=settings.secret,
            trusted_origins=settings.trusted_origins,
            queues=settings.queues,
        )
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            root_path=settings.root_path,
            log_level="info",
            proxy_headers=False,
            server_header=False,
        )
        await uvicorn.Server(config).serve()
    finally:
        await redis.aclose()
