"""safe-openai: a drop-in OpenAI client that ties every call to an end customer.

Change one import and every model call is moderated before it reaches a model, tagged with a
hashed ``safety_identifier``, checked against the customer's standing and quotas, and its usage
recorded per customer::

    from safe_openai import SafeClient

    client = SafeClient(store="sqlite:///usage.db")
    reply = client.for_customer("acme-corp").chat.completions.create(...)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The public submodules, attributes of the package once used (see _SUBMODULES).
    from . import (  # noqa: F401
        alerts,
        errors,
        policy,
        standing,
        stores,
        telemetry,
        testing,
        usage,
        web,
        webhooks,
    )
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

    __version__: str

# The module each public name lives in, imported when the name is first used: ``import
# safe_openai`` alone imports neither the SDK nor the guard, so the command line (a submodule)
# starts without them, and ``from safe_openai import SafeClient`` imports what a guarded call
# needs and no more (webhooks, batches, WebSockets, testing load on first use).
_SOURCES = {
    "AsyncModerator": "._moderation",
    "AsyncSafeClient": "._client",
    "BatchBlocked": ".errors",
    "BatchFileError": ".errors",
    "ConfigurationError": ".errors",
    "CustomerRequired": ".errors",
    "CustomerSuspended": ".errors",
    "Decision": ".policy",
    "DefaultPolicy": ".policy",
    "GuardedRequest": ".policy",
    "InvalidCustomerId": ".errors",
    "LimitUsage": ".stores",
    "ModerationBlocked": ".errors",
    "ModerationInput": "._moderation",
    "ModerationResult": ".policy",
    "ModerationUnavailable": ".errors",
    "Moderator": "._moderation",
    "OutputBlocked": ".errors",
    "Policy": ".policy",
    "PolicyDenied": ".errors",
    "Price": ".usage",
    "PriceTable": ".usage",
    "Quota": ".policy",
    "QuotaExceeded": ".errors",
    "SafeClient": "._client",
    "SafeOpenAIError": ".errors",
    "Standing": ".standing",
    "StoreError": ".errors",
    "TokenUsage": ".usage",
    "UnguardedPathError": ".errors",
    "UnpricedModel": ".errors",
    "UsageRecord": ".usage",
    "Verdict": ".policy",
    "WebhookInProgress": ".errors",
    "WebhookVerificationError": ".errors",
    "customer": "._identity",
    "identifier_for": "._identity",
    "rate_limit_headers": ".standing",
}


#: The public submodules, imported when first used as an attribute (``import safe_openai`` then
#: ``safe_openai.stores.store_from_url(...)``), as they were when the package imported them all.
_SUBMODULES = frozenset(
    (
        "alerts",
        "errors",
        "policy",
        "standing",
        "stores",
        "telemetry",
        "testing",
        "usage",
        "web",
        "webhooks",
    )
)


# Defined for the interpreter only: a type checker that saw a module ``__getattr__`` would take
# any name at all from the package (``from safe_openai import SafeClinet`` passed mypy --strict
# and pyright); it reads the names from the imports above instead.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name == "__version__":
            from importlib.metadata import PackageNotFoundError, version

            try:
                value: Any = version("safe-openai")
            except PackageNotFoundError:  # pragma: no cover - running from a source tree
                value = "0.0.0"
        elif name in _SOURCES or name in _SUBMODULES:
            source = _SOURCES.get(name, "." + name)
            try:
                module = importlib.import_module(source, __name__)
            except AttributeError as exc:
                # Raised inside the module (an SDK without an attribute it uses): passed on as
                # an AttributeError, ``from safe_openai import X`` would say only "cannot import
                # name X" and ``hasattr`` would answer False, hiding why.
                raise ImportError(
                    f"{__name__}.{name} could not be loaded: importing {__name__}{source} raised "
                    f"AttributeError: {exc}"
                ) from exc
            value = module if name in _SUBMODULES else getattr(module, name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value  # the next use is a plain attribute
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
