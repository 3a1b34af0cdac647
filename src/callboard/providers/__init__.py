"""Webhook provider modules: GitHub, GitLab, Bitbucket Cloud and Server, Azure DevOps, Gerrit,
Gitea, and the Standard Webhooks and generic HMAC validators any topic can use.

Each provider module holds pure functions of a request's headers, raw body and secrets
(``verify``, ``sub_topic``, ``delivery_id``) and a ``module`` object that wires them into
callboard. A provider is switched on by its key under ``events.modules``.
"""

from callboard.providers._signatures import Failure, HmacScheme, SignatureFailures

__all__ = ["Failure", "HmacScheme", "SignatureFailures"]
