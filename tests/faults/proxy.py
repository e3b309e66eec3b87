"""A lost-reply fault proxy for the tests, on loopback only.

``LostReplyProxy(host, port)`` listens on 127.0.0.1 (a random port) and forwards every
connection to the Redis server at host:port. It reads the client's commands (RESP
arrays) one at a time, forwards each, and reads Redis' reply before relaying it, so for
a command that matches its rule it can let Redis execute the command and then drop the
client's connection instead of relaying the reply: the client sees a dropped connection
for a command that took effect, as after a network failure on the way back.

The rule is ``rule(command, reply) -> bool`` (``command`` the list of its arguments,
``reply`` Redis' raw reply); ``proxy.faults`` counts the replies dropped. ``every_script_once``
is the rule the tests use: each distinct EVAL/EVALSHA command (same bytes) loses its first
reply that is not a NOSCRIPT error, and gets the next one.

A connection that subscribes (SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE) is relayed as raw bytes
from then on: its replies no longer follow its commands one to one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Rule = Callable[[list[bytes], bytes], bool]

# How long one read from either side may take before the connection is given up (the
# proxy must stop by itself even when a peer hangs).
READ_TIMEOUT = 30.0
SUBSCRIBING = frozenset({b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"})
SCRIPTS = frozenset({b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO"})


def no_fault(command: list[bytes], reply: bytes) -> bool:
    return False


def every_script_once() -> Rule:
    """Drop the reply of each distinct script call once (not a NOSCRIPT error: the
    script did not run)."""
    seen: set[tuple[bytes, ...]] = set()

    def rule(command: list[bytes], reply: bytes) -> bool:
        if command[0].upper() not in SCRIPTS or reply.startswith(b"-NOSCRIPT"):
            return False
        key = tuple(command)
        if key in seen:
            return False
        seen.add(key)
        return True

    return rule


def command_named(name: str, nth: int = 1) -> Rule:
    """Drop the reply of the ``nth`` command called ``name`` (counted from 1), once."""
    count = 0

    def rule(command: list[bytes], reply: bytes) -> bool:
        nonlocal count
        if command[0].upper() != name.upper().encode():
            return False
        count += 1
        return count == nth

    return rule


async def _read_command(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes] | None:
    """One client command: its arguments and its raw bytes (None at end of stream)."""
    line = await reader.readline()
    if not line:
        return None
    if not line.startswith(b"*"):  # an inline command (redis-cli style)
        return line.split(), line
    raw = [line]
    args: list[bytes] = []
    for _ in range(int(line[1:])):
        head = await reader.readline()
        raw.append(head)
        body = await reader.readexactly(int(head[1:]) + 2)
        raw.append(body)
        args.append(body[:-2])
    return args, b"".join(raw)


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    """One reply (RESP2 or RESP3), raw."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind = line[:1]
    if kind in b"$!=":
        size = int(line[1:])
        return line if size < 0 else line + await reader.readexactly(size + 2)
    if kind in b"*~>%|":
        count = int(line[1:])
        if kind in b"%|":
            count *= 2
        parts = [line]
        for _ in range(max(count, 0)):
            parts.append(await _read_reply(reader))
        return b"".join(parts)
    return line  # + - : _ , # ( single-line replies


class LostReplyProxy:
    """``async with LostReplyProxy(host, port) as proxy:`` then connect to ``proxy.port``."""

    def __init__(
        self, host: str, port: int, rule: Rule = no_fault, on_drop: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.host = host
        self.upstream_port = port
        self.rule = rule
        # awaited after a reply is dropped and before the client's connection is closed:
        # what it does happens before the client can re-send (a concurrent call, say)
        self.on_drop = on_drop
        self.faults = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LostReplyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        upstream_w: asyncio.StreamWriter | None = None
        try:
            upstream_r, upstream_w = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.upstream_port), READ_TIMEOUT
            )
            while True:
                got = await asyncio.wait_for(_read_command(client_r), READ_TIMEOUT)
                if got is None:
                    return
                command, raw = got
                upstream_w.write(raw)
                await upstream_w.drain()
                if command and command[0].upper() in SUBSCRIBING:
                    await self._relay(client_r, client_w, upstream_r, upstream_w)
                    return
                reply = await asyncio.wait_for(_read_reply(upstream_r), READ_TIMEOUT)
                if command and self.rule(command, reply):
                    self.faults += 1
                    if self.on_drop is not None:
                        await self.on_drop()
                    return  # Redis executed it; the client never hears back
                client_w.write(reply)
                await client_w.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            for writer in (client_w, upstream_w):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()

    @staticmethod
    async def _relay(
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
    ) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(pipe(client_r, upstream_w)), asyncio.ensure_future(pipe(upstream_r, client_w))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
