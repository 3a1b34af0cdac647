"""callboard's JSON error shape, the same as Backstage's error responses.

Every refusal callboard answers over HTTP (the webhook ingress, the bus, the server's own bounds)
has one body: ``{"error": {"name", "message"}, "request": {"method", "url"},
"response": {"statusCode"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


def error_body(scope: Mapping[str, Any], status: int, name: str, message: str) -> bytes:
    """The JSON body of a refusal of the request ``scope`` (an ASGI scope, or its
    ``method``, ``path`` and ``query_string``)."""
    url = scope["path"]
    if scope.get("query_string"):
        url += "?" + scope["query_string"].decode("latin-1")
    return orjson.dumps(
        {
            "error": {"name": name, "message": message},
            "request": {"method": scope["method"], "url": url},
            "response": {"statusCode": status},
        }
    )
