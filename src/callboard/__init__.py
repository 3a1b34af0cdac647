"""callboard: webhooks in, validated, routed and delivered at least once."""

from callboard.app import Callboard, CallboardApp, build, create_app
from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    IN_PROCESS,
    MAX_PAGE,
    Broker,
    BrokerAdmin,
    BrokerFactory,
    BrokerHealth,
    Capabilities,
    Consumer,
    Delivery,
    EventLog,
    EventPage,
    EventQuery,
    Outcome,
    OutcomeState,
    RetentionPolicy,
    Start,
    StoredEvent,
    SubscriptionInfo,
    dead_letter_topic,
)
from callboard.brokers.memory import MemoryBroker
from callboard.brokers.storable import check_storable
from callboard.config import Config, load_config
from callboard.deadletters import DeadLetter
from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy
from callboard.errors import (
    BrokerError,
    BrokerUnavailable,
    CallboardError,
    ConfigError,
    HandlerTimeoutError,
    InvalidEventError,
    InvalidTopicError,
    MalformedBodyError,
    ModuleError,
    PayloadTooLargeError,
    RequestRejected,
    ServiceClosedError,
    SubscriptionError,
    UnsupportedMediaTypeError,
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
from callboard.topics import TopicMatcher

__version__ = "0.1.0"


__all__ = [
    "DEAD_LETTER_PREFIX",
    "DELIVERY_ID",
    "IN_PROCESS",
    "MAX_PAGE",
    "BodyParser",
    "Broker",
    "BrokerAdmin",
    "BrokerError",
    "BrokerFactory",
    "BrokerHealth",
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
    "EventLog",
    "EventPage",
    "EventQuery",
    "EventRouter",
    "EventsService",
    "Handler",
    "HandlerTimeoutError",
    "IngressPoint",
    "InvalidEventError",
    "InvalidTopicError",
    "LifecyclePoint",
    "MalformedBodyError",
    "MediaType",
    "MemoryBroker",
    "Module",
    "ModuleContext",
    "ModuleError",
    "Outcome",
    "OutcomeState",
    "PayloadTooLargeError",
    "Rejection",
    "RequestRejected",
    "RetentionPolicy",
    "RetryPolicy",
    "ServiceClosedError",
    "Start",
    "StoredEvent",
    "SubTopicEventRouter",
    "Subscriber",
    "SubscriberPoint",
    "Subscription",
    "SubscriptionError",
    "SubscriptionInfo",
    "TopicMatcher",
    "UnsupportedMediaTypeError",
    "Validator",
    "WebhookRequest",
    "__version__",
    "build",
    "check_storable",
    "create_app",
    "dead_letter_topic",
    "load_config",
    "module",
]
