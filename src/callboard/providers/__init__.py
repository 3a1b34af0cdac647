"""Webhook provider modules: GitHub, GitLab, Bitbucket Cloud and Server, Azure DevOps, Gerrit,
Gitea, and the Standard Webhooks and generic HMAC validators any topic can use.

Each provider module holds pure functions of a request's headers, raw body and secrets
(``verify``, ``sub_topic``, ``delivery_id``) and declares its topic once, in a ``ProviderSpec``
(``_wiring``): settings, scheme, credentials, headers kept out of events, delivery id and
routing rule. One engine (``_wiring.add_topic``) wires every spec into callboard, and each
``verify`` calls the scheme its spec names, so ``verify`` is the check the ingress runs. A
provider is switched on by its key under ``events.modules``.
"""

from callboard.providers._signatures import Failure, HmacScheme, SignatureFailures

__all__ = ["Failure", "HmacScheme", "SignatureFailures"]
