"""Helpers for testing code that uses callboard."""

from callboard.testing.recording import (
    FAST_RETRY,
    DeadLetterCall,
    RecordingEventsService,
    SubscribeCall,
)
from callboard.testing.signing import (
    basic_auth,
    new_standard_webhooks_secret,
    sign_azure_devops,
    sign_bitbucket_cloud,
    sign_bitbucket_server,
    sign_gerrit,
    sign_gitea,
    sign_github,
    sign_gitlab,
    sign_hmac,
    sign_standard_webhooks,
)

__all__ = [
    "FAST_RETRY",
    "DeadLetterCall",
    "RecordingEventsService",
    "SubscribeCall",
    "basic_auth",
    "new_standard_webhooks_secret",
    "sign_azure_devops",
    "sign_bitbucket_cloud",
    "sign_bitbucket_server",
    "sign_gerrit",
    "sign_gitea",
    "sign_github",
    "sign_gitlab",
    "sign_hmac",
    "sign_standard_webhooks",
]
