"""The dashboard's guards: CSRF tokens, signed flash messages, optional login, headers.

- Every state change is a POST carrying a token: the HMAC (with the app's secret) of a
  random nonce kept in an HttpOnly, SameSite=Strict cookie. A page from another site can
  neither read the cookie nor compute the token; a cookie planted by a sibling domain has
  no valid token either. A POST whose ``Origin`` or ``Sec-Fetch-Site`` says it comes from
  another site is refused as well.
- The message shown after an action travels in a signed cookie, read once.
- ``login=(user, password)`` requires HTTP basic auth on every request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "astages_csrf"
CSRF_FIELD = "csrf"
FLASH_COOKIE = "astages_flash"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Signer:
    """HMAC-SHA256 with the app's secret."""

    secret: bytes

    def sign(self, value: str) -> str:
        return hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()

    def csrf_token(self, nonce: str) -> str:
        return self.sign("csrf:" + nonce)

    def check_csrf(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(self.csrf_token(nonce), token)

    def flash(self, message: str, kind: str = "info") -> str:
        body = quote(f"{kind}:{message}", safe="")
        return f"{body}.{self.sign('flash:' + body)}"

    def read_flash(self, raw: str | None) -> tuple[str, str] | None:
        """(kind, message) of a flash cookie we signed, else None."""
        if not raw or "." not in raw:
            return None
        body, signature = raw.rsplit(".", 1)
        if not hmac.compare_digest(self.sign("flash:" + body), signature):
            return None
        kind, _, message = unquote(body).partition(":")
        return kind, message


def new_nonce() -> str:
    return secrets.token_hex(16)


def cookie_path(request: Request) -> str:
    return request.scope.get("root_path", "") or "/"


def normal_origin(origin: str) -> str:
    """``scheme://host[:port]`` of an origin or URL, lower-cased (ValueError when it has
    no scheme or host)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"a trusted origin is scheme://host[:port], such as https://ops.example.com, not {origin!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request, trusted: frozenset[str] = frozenset()) -> bool:
    """False when the browser says the request came from another site. ``trusted``
    origins (normalized) are this site too: behind a reverse proxy that rewrites ``Host``,
    the page's own origin is not the ``Host`` the app sees."""
    headers = request.headers
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    if urlsplit(origin).netloc == headers.get("host", ""):
        return True
    try:
        return normal_origin(origin) in trusted
    except ValueError:
        return False


def safe_next(value: str | None, root: str, default: str) -> str:
    """``value`` when it is a path inside this app (no open redirect), else ``default``."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    if root and not (parts.path == root or parts.path.startswith(root.rstrip("/") + "/")):
        return default
    return value


class BasicAuth:
    """ASGI middleware: HTTP basic auth with one user and password on every request."""

    def __init__(self, app: ASGIApp, user: str, password: str, realm: str = "astages") -> None:
        self.app = app
        self.expected = hashlib.sha256(f"{user}:{password}".encode()).digest()
        self.realm = realm

    def _allowed(self, headers: Headers) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hashlib.sha256(given).digest(), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._allowed(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "Log in to see the astages dashboard.",
            status_code=401,
            headers={"www-authenticate": f'Basic realm="{self.realm}", charset="UTF-8"'},
        )
        await response(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: adds SECURITY_HEADERS to every HTTP response that lacks them."""

    def __init__(self, app: ASGIApp, headers: Mapping[str, str] = SECURITY_HEADERS) -> None:
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def forget_flash(response: Response, request: Request) -> None:
    response.delete_cookie(FLASH_COOKIE, path=cookie_path(request))
