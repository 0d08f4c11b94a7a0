"""API keys: the ASGI middleware that asks /v1 requests for `Authorization: Bearer <key>`
(`nanorun serve --api-key`, vLLM's check)."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .protocol import error_body


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on the /v1 routes (below --root-path), as vLLM checks
    --api-key: anything else there is a 401; /health, /ping, /metrics, /version, /tokenize
    and /detokenize stay open, and so do CORS preflights (OPTIONS)."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self._keys = [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and \
                _route_path(scope).startswith("/v1") and not self._authorized(scope):
            body = error_body("a valid API key is needed: send `Authorization: Bearer <key>` "
                              "(the server's --api-key)", "AuthenticationError", None, 401)
            await JSONResponse(body, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        # Compare every key in constant time: how long a refusal takes says nothing.
        return any([hmac.compare_digest(given, k) for k in self._keys])


def _route_path(scope: Scope) -> str:
    root, path = scope.get("root_path", ""), scope["path"]
    return path[len(root):] if root and path.startswith(root) else path
