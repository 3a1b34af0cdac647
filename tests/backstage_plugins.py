"""Backstage backend plugins as the bus sees them: signing keys and plugin tokens made as
Backstage makes them (ES256 keys with a random ``kid``, ``typ: vnd.backstage.plugin``)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

PLUGIN_TYP = "vnd.backstage.plugin"


@dataclass
class SigningKey:
    """One EC P-256 key pair, published as Backstage publishes it (``kid`` and ``alg`` set)."""

    kid: str = field(default_factory=lambda: str(uuid.uuid4()))
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    @property
    def jwk(self) -> dict[str, Any]:
        public: dict[str, Any] = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": "ES256"}


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """The document a plugin serves at ``/.backstage/auth/v1/jwks.json``."""
    return {"keys": [key.jwk for key in keys]}


def plugin_token(
    key: SigningKey,
    plugin_id: str = "catalog",
    *,
    audience: str | list[str] = "events",
    typ: str = PLUGIN_TYP,
    lifetime: float = 3600,
    issued: float | None = None,
    kid: str | None = None,
    leave_out: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A plugin token as ``auth.getPluginRequestToken`` issues it for ``targetPluginId: events``."""
    iat = int(time.time() if issued is None else issued)
    body: dict[str, Any] = {
        "sub": plugin_id,
        "aud": audience,
        "iat": iat,
        "exp": iat + int(lifetime),
    }
    body.update(claims)
    for name in leave_out:
        body.pop(name, None)
    headers = {"typ": typ, "kid": key.kid if kid is None else kid}
    return jwt.encode(body, key.private, algorithm="ES256", headers=headers)
