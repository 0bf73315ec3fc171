"""safe-openai: a drop-in OpenAI client that ties every call to an end customer.

Change one import and every model call is moderated before it reaches a model, tagged with a
hashed ``safety_identifier``, checked against the customer's standing and quotas, and its usage
recorded per customer::

    from safe_openai import SafeClient

    client = SafeClient(store="sqlite:///usage.db")
    reply = client.for_customer("acme-corp").chat.completions.create(...)
"""

from importlib.metadata import PackageNotFoundError, version

from ._client import AsyncSafeClient, SafeClient
from ._identity import customer, identifier_for
from ._moderation import AsyncModerator, ModerationInput, Moderator
from .errors import (
    BatchBlocked,
    BatchFileError,
    ConfigurationError,
    CustomerRequired,
    CustomerSuspended,
    InvalidCustomerId,
    ModerationBlocked,
    ModerationUnavailable,
    OutputBlocked,
    PolicyDenied,
    QuotaExceeded,
    SafeOpenAIError,
    StoreError,
    UnguardedPathError,
    UnpricedModel,
    WebhookInProgress,
    WebhookVerificationError,
)
from .policy import (
    Decision,
    DefaultPolicy,
    GuardedRequest,
    ModerationResult,
    Policy,
    Quota,
    Verdict,
)
from .standing import Standing, rate_limit_headers
from .stores import LimitUsage
from .usage import Price, PriceTable, TokenUsage, UsageRecord

try:
    __version__ = version("safe-openai")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AsyncModerator",
    "AsyncSafeClient",
    "BatchBlocked",
    "BatchFileError",
    "ConfigurationError",
    "CustomerRequired",
    "CustomerSuspended",
    "Decision",
    "DefaultPolicy",
    "GuardedRequest",
    "InvalidCustomerId",
    "LimitUsage",
    "ModerationBlocked",
    "ModerationInput",
    "ModerationResult",
    "ModerationUnavailable",
    "Moderator",
    "OutputBlocked",
    "Policy",
    "PolicyDenied",
    "Price",
    "PriceTable",
    "Quota",
    "QuotaExceeded",
    "SafeClient",
    "SafeOpenAIError",
    "Standing",
    "StoreError",
    "TokenUsage",
    "UnguardedPathError",
    "UnpricedModel",
    "UsageRecord",
    "Verdict",
    "WebhookInProgress",
    "WebhookVerificationError",
    "__version__",
    "customer",
    "identifier_for",
    "rate_limit_headers",
]
