"""The practical ceiling: a bare Starlette route that checks the GitHub HMAC and parses the JSON.

Run with uvicorn exactly as ``callboard serve`` runs (one process, uvloop and httptools when
installed, no access log): ``python bench/bare_starlette.py PORT``.
"""

from __future__ import annotations

import hashlib
import hmac
import sys

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SECRET = b"bench-secret"


async def plain(request: Request) -> Response:
    orjson.loads(await request.body())
    return JSONResponse({"status": "accepted"}, status_code=202)


async def github(request: Request) -> Response:
    body = await request.body()
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, request.headers.get("x-hub-signature-256", "")):
        return JSONResponse({}, status_code=403)
    orjson.loads(body)
    return JSONResponse({"status": "accepted"}, status_code=202)


app = Starlette(
    routes=[
        Route("/api/events/http/plain", plain, methods=["POST"]),
        Route("/api/events/http/github", github, methods=["POST"]),
    ]
)

if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=False,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
    )
