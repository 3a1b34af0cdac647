"""callboard: webhooks in, validated, routed and delivered at least once."""

from callboard.app import Callboard, CallboardApp, build, create_app
from callboard.brokers.base import Broker, Capabilities, Consumer, Delivery, Start
from callboard.brokers.memory import MemoryBroker
from callboard.config import Config, load_config
from callboard.deadletters import DeadLetter
from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy
from callboard.errors import (
    BrokerError,
    BrokerUnavailable,
    CallboardError,
    ConfigError,
    InvalidEventError,
    InvalidTopicError,
    ModuleError,
    RequestRejected,
    ServiceClosedError,
    SubscriptionError,
)
from callboard.events import DELIVERY_ID, Event
from callboard.extensions import (
    BrokerPoint,
    IngressPoint,
    LifecyclePoint,
    Module,
    ModuleContext,
    SubscriberPoint,
    module,
)
from callboard.ingress.types import BodyParser, MediaType, Rejection, Validator, WebhookRequest
from callboard.routing import EventRouter, SubTopicEventRouter
from callboard.service import EventsService, Handler, Subscriber, Subscription

__version__ = "0.1.0"


__all__ = [
    "DELIVERY_ID",
    "BodyParser",
    "Broker",
    "BrokerError",
    "BrokerPoint",
    "BrokerUnavailable",
    "Callboard",
    "CallboardApp",
    "CallboardError",
    "Capabilities",
    "Config",
    "ConfigError",
    "Consumer",
    "DeadLetter",
    "DefaultEventsService",
    "Delivery",
    "Event",
    "EventRouter",
    "EventsService",
    "Handler",
    "IngressPoint",
    "InvalidEventError",
    "InvalidTopicError",
    "LifecyclePoint",
    "MediaType",
    "MemoryBroker",
    "Module",
    "ModuleContext",
    "ModuleError",
    "Rejection",
    "RequestRejected",
    "RetryPolicy",
    "ServiceClosedError",
    "Start",
    "SubTopicEventRouter",
    "Subscriber",
    "SubscriberPoint",
    "Subscription",
    "SubscriptionError",
    "Validator",
    "WebhookRequest",
    "__version__",
    "build",
    "create_app",
    "load_config",
    "module",
]
