"""Who a call is for: the customer context, and the hashed safety identifier sent to OpenAI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

from .errors import ConfigurationError

__all__ = [
    "SECRET_ENV",
    "current_customer",
    "customer",
    "identifier_for",
    "resolve_secret",
    "safety_identifier",
]

SECRET_ENV = "SAFE_OPENAI_IDENTIFIER_SECRET"

_customer: ContextVar[str | None] = ContextVar("safe_openai_customer", default=None)


def validate_customer_id(customer_id: object) -> str:
    """Return ``customer_id`` if it is a usable id, else raise ``ValueError``."""
    if not isinstance(customer_id, str) or not customer_id.strip():
        raise ValueError(f"customer id must be a non-empty string, got {customer_id!r}")
    if len(customer_id) > 256:
        raise ValueError("customer id must be at most 256 characters")
    return customer_id


@contextmanager
def customer(customer_id: str) -> Iterator[str]:
    """Bind the end customer of every guarded call made inside the block.

    It is a context variable: it holds per request in web apps and across ``await``; tasks
    created inside the block inherit it, threads started inside it do not.

    Example::

        with safe_openai.customer("acme-corp"):
            client.chat.completions.create(...)
    """
    token = _customer.set(validate_customer_id(customer_id))
    try:
        yield customer_id
    finally:
        _customer.reset(token)


def current_customer() -> str | None:
    """The customer bound by the innermost :func:`customer` block, if any."""
    return _customer.get()


def resolve_secret(secret: str | bytes | None) -> bytes:
    """The identifier secret as bytes: the argument, else ``SAFE_OPENAI_IDENTIFIER_SECRET``.

    Raises:
        ConfigurationError: No secret is configured, or it is empty.
    """
    if secret is None:
        secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise ConfigurationError(
            "No identifier secret: pass identifier_secret=... or set the "
            f"{SECRET_ENV} environment variable to a long random string "
            '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))").'
        )
    return secret.encode() if isinstance(secret, str) else bytes(secret)


@lru_cache(maxsize=65536)
def safety_identifier(secret: bytes, customer_id: str) -> str:
    """HMAC-SHA256 of the customer id under the secret, as 43 URL-safe characters.

    Stable for a given secret, so OpenAI sees one identifier per customer; one-way, so the raw
    id never leaves the application.
    """
    digest = hmac.new(secret, customer_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def identifier_for(customer_id: str, *, secret: str | bytes | None = None) -> str:
    """The ``safety_identifier`` guarded calls send for ``customer_id``.

    For support tickets and OpenAI safety cases: it is the value OpenAI sees and names in its
    enforcement events. The way back (identifier to customer) is the store's
    ``customer_for_identifier``, or ``safe-openai whois IDENTIFIER``.

    Args:
        customer_id: The end customer.
        secret: The identifier secret; default ``SAFE_OPENAI_IDENTIFIER_SECRET``.

    Raises:
        ConfigurationError: No secret is configured.
        ValueError: ``customer_id`` is not a usable customer id.
    """
    return safety_identifier(resolve_secret(secret), validate_customer_id(customer_id))
