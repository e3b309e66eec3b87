"""``astages web``: loopback by default, a login required beyond it, and a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from astages.cli import main
from astages.web.serve import PASSWORD_ENV, USER_ENV, UnsafeBind, WebSettings, is_loopback


def test_loopback_addresses() -> None:
    """127.0.0.0/8, ::1 and localhost are loopback; anything else is not."""
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_settings_need_a_password_beyond_loopback() -> None:
    """Serving on a public address without ASTAGES_WEB_PASSWORD is refused; with it, basic auth is on."""
    with pytest.raises(UnsafeBind, match="ASTAGES_WEB_PASSWORD"):
        WebSettings.of("redis://x", "0.0.0.0", 8080, environ={})
    settings = WebSettings.of("redis://x", "0.0.0.0", 8080, environ={PASSWORD_ENV: "pw"})
    assert settings.login == ("astages", "pw")
    assert WebSettings.of("redis://x", "127.0.0.1", 8080, environ={}).login is None
    named = WebSettings.of("redis://x", "::1", 1, root_path="/ops/", environ={PASSWORD_ENV: "pw", USER_ENV: "ops"})
    assert named.login == ("ops", "pw") and named.root_path == "/ops"


def test_command_refuses_public_address_without_login() -> None:
    """``astages web --host 0.0.0.0`` without a password exits 1 with one line saying why."""
    result = CliRunner().invoke(main, ["web", "--host", "0.0.0.0"], env={PASSWORD_ENV: ""})
    assert result.exit_code == 1
    assert "refusing to serve the dashboard on 0.0.0.0" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_command_serves_the_dashboard(redis_server: Any, real_redis: Any) -> None:
    """The command serves the dashboard on 127.0.0.1 behind the login given in the environment."""
    port = _free_port()
    env = {**os.environ, PASSWORD_ENV: "pw", USER_ENV: "ops"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from astages.cli import main; main()",
        "web",
        "--redis-url",
        redis_server.url,
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            reply = None
            async with asyncio.timeout(20):
                while reply is None:
                    try:
                        reply = await client.get("/", auth=("ops", "pw"))
                    except httpx.TransportError:
                        if process.returncode is not None:
                            raise AssertionError("astages web exited early") from None
                        await asyncio.sleep(0.05)
            assert reply.status_code == 200 and "Staged groups" in reply.text
            assert (await client.get("/")).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await process.wait()
        assert process.stderr is not None
        await process.stderr.read()
