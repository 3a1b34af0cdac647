"""The request log: one line for every webhook the ingress refused.

Logged on ``callboard.ingress`` with the topic, status, reason and the sender's delivery id
(``X-GitHub-Delivery`` and the like), never a header's value otherwise, a secret or a
signature. Refusals that point to a set-up that does not match (a signature or token that does
not verify, a topic that is not configured, a body over ``events.http.bodyLimit``, a media
type without a parser) are warnings; the others (a malformed body, a wrong method, a server-side
failure, which is logged with its cause already) are info. Accepted requests are not logged
here: ``backend.accessLog`` logs every request.
"""

from __future__ import annotations

import logging

from callboard.ingress.types import IngressOutcome

#: Statuses that say the sender and callboard are not set up alike.
MISCONFIGURED = frozenset({401, 403, 404, 413, 415})
#: What a logged reason may take up, in characters.
MAX_REASON = 500


class RequestLog:
    """An ``IngressObserver`` that logs refused requests."""

    #: Accepted requests are not its business: the ingress builds nothing for it then.
    refusals_only = True

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger if logger is not None else logging.getLogger("callboard.ingress")

    def request(self, outcome: IngressOutcome) -> None:
        status = outcome.status
        if status < 400:
            return
        level = logging.WARNING if status in MISCONFIGURED else logging.INFO
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        reason = printable(outcome.reason or "", MAX_REASON)
        delivery = printable(outcome.delivery_id, 200) if outcome.delivery_id else None
        logger.log(
            level,
            "refused a webhook for topic %r with %d: %s%s",
            outcome.topic,
            status,
            reason,
            f" (delivery {delivery})" if delivery else "",
            extra={
                "topic": outcome.topic,
                "status": status,
                "reason": reason,
                "delivery_id": delivery,
            },
        )


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with control characters escaped: what a sender
    wrote (a path, a header) never starts a line of its own in the log."""
    cut = text[:limit] + ("…" if len(text) > limit else "")
    if cut.isprintable():
        return cut
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
