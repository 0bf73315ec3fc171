"""``copy()`` / ``with_options()`` with the SDK's own signature plus the guard's settings.

The SDK's ``copy`` lists every client option as a typed keyword; tools read it
(``inspect.signature``, ``typing.get_type_hints``, IDEs, libraries that check which options a
client takes). The guarded copy takes those options, read from the installed SDK so that a
release that adds one needs no change here, and the guard's own (``policy``, ``store``, ...),
so that a copy can differ from its client.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["GUARD_PARAMETERS", "signed_copy"]

#: The guard settings a copy may change, in the order the constructors take them.
GUARD_PARAMETERS = ("policy", "store", "identifier_secret", "moderator", "prices", "spool")

_F = TypeVar("_F", bound=Callable[..., Any])


def signed_copy(sdk_copy: Callable[..., Any], guard_types: Mapping[str, Any]) -> Callable[[_F], _F]:
    """Sign a copy method (which takes ``self`` and ``**kwargs``) as ``sdk_copy`` plus the
    guard's settings, typed by ``guard_types`` (evaluated types, one per
    :data:`GUARD_PARAMETERS`), all keyword-only and ``None`` by default (keep the client's).

    ``__wrapped__`` points at the SDK's method, so ``typing.get_type_hints`` resolves the SDK's
    annotations in the SDK's module, where their names live.
    """
    sdk = inspect.signature(sdk_copy)
    params = list(sdk.parameters.values())
    # The guard's settings go after the SDK's public options, before its private ones.
    at = next((i for i, p in enumerate(params) if p.name.startswith("_")), len(params))
    guard = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in guard_types.items()
    ]
    signature = sdk.replace(parameters=[*params[:at], *guard, *params[at:]])

    def sign(body: _F) -> _F:
        method: Any = body
        method.__signature__ = signature
        method.__annotations__ = {**getattr(sdk_copy, "__annotations__", {}), **guard_types}
        method.__wrapped__ = sdk_copy
        return body

    return sign
