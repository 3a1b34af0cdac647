"""The events bus over HTTP: Backstage's ``/api/events/bus/v1`` and callboard's leased reads.

- ``auth``: bearer tokens from ``backend.auth.externalAccess`` (pure).
- ``wire``: the JSON shapes, shared by server and client.
- ``feeds``: a server's subscriptions over any broker; ``api``: the routes.
- ``client``: the HTTP client (the only module that imports httpx); ``remote``: ``RemoteBroker``.
- ``admin``: what the ``subscriptions``, ``dead-letters`` and ``replay`` commands do.
"""
