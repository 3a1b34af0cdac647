"""What the AWS bridges share: the client settings and making a client.

The SDK (aiobotocore, the ``aws`` extra) is imported lazily, when a bridge opens its client:
callboard without the extra loads, and a configuration that names an AWS bridge is refused at
registration with an error naming the extra (``require_sdk``), before anything starts.

Credentials come from the SDK's default chain (environment, shared files, instance or task
role) unless ``accessKeyId`` and ``secretAccessKey`` are both set; ``endpoint`` points a client
at LocalStack or moto instead of AWS.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from callboard.bridges.settings import require_extra
from callboard.settings import Section

#: The AWS services the bridges talk to, by the SDK's name for each.
Service = Literal["sqs", "sns", "events"]

#: Seconds a connection may take to open; a read waits longer than the longest SQS long poll.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: Calls the SDK makes per request, the first included (its ``standard`` retry mode), before the
#: bridge's own back-off or the delivery policy takes over.
SDK_ATTEMPTS = 2


class ClientSettings(Section):
    """Where and as whom an AWS client connects."""

    #: The AWS region (``eu-west-1``); the SDK's default chain (``AWS_REGION``) when unset.
    region: str | None = None
    #: Another endpoint than AWS's own: LocalStack, moto.
    endpoint: str | None = None
    access_key_id: str | None = Field(default=None, alias="accessKeyId")
    secret_access_key: SecretStr | None = Field(default=None, alias="secretAccessKey")
    session_token: SecretStr | None = Field(default=None, alias="sessionToken")

    @model_validator(mode="after")
    def _key_pair(self) -> ClientSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "set both accessKeyId and secretAccessKey, or neither (then the SDK's default "
                "credential chain is used: environment, shared files, instance or task role)"
            )
        return self


def require_sdk(module: str) -> None:
    """Refuse to register an AWS bridge when the SDK (the ``aws`` extra) is not installed."""
    require_extra(module, "aiobotocore", "aws", "needs the AWS SDK (aiobotocore)")


def client(service: Service, settings: ClientSettings) -> AbstractAsyncContextManager[Any]:
    """An SDK client of ``service`` as ``settings`` say; entered, it is open until exited."""
    from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
    from aiobotocore.session import get_session  # type: ignore[import-untyped]

    secret, token = settings.secret_access_key, settings.session_token
    made: AbstractAsyncContextManager[Any] = get_session().create_client(
        service,
        region_name=settings.region,
        endpoint_url=settings.endpoint,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret is not None else None,
        aws_session_token=token.get_secret_value() if token is not None else None,
        config=AioConfig(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": SDK_ATTEMPTS},
        ),
    )
    return made


def refusal(error: Exception) -> tuple[str, str] | None:
    """The service's error code and message when ``error`` is its answer refusing a request;
    ``None`` for anything else (no connection, a timeout)."""
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    if not isinstance(error, ClientError):
        return None
    details = error.response.get("Error", {})
    return details.get("Code", "?"), details.get("Message", "")


def sdk_error(error: BaseException) -> bool:
    """Whether ``error`` is the SDK's: a service's refusal, or no connection or answer."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(error, BotoCoreError | ClientError)
