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

from .errors import ConfigurationError, InvalidCustomerId

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
    """Return ``customer_id`` if it is a usable id.

    Raises:
        InvalidCustomerId: not a string, blank, longer than 256 characters, or not encodable
            as UTF-8 (a lone surrogate), which the store and the identifier's HMAC need.
    """
    if not isinstance(customer_id, str) or not customer_id.strip():
        kind = type(customer_id).__name__
        raise InvalidCustomerId(f"customer id must be a non-empty string, got a blank {kind}")
    if len(customer_id) > 256:
        raise InvalidCustomerId("customer id must be at most 256 characters")
    try:
        customer_id.encode()
    except UnicodeEncodeError:
        raise InvalidCustomerId("customer id must be valid Unicode text (UTF-8)") from None
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


#: The shortest identifier secret accepted, in bytes (``secrets.token_urlsafe(16)`` is 22).
MIN_SECRET_BYTES = 16

_HOW_TO = (
    f"pass identifier_secret=... or set the {SECRET_ENV} environment variable to a long random "
    'string (e.g. python -c "import secrets; print(secrets.token_urlsafe(32))").'
)


def resolve_secret(secret: str | bytes | None) -> bytes:
    """The identifier secret as bytes: the argument, else ``SAFE_OPENAI_IDENTIFIER_SECRET``.

    Raises:
        ConfigurationError: No secret is configured, or it is not a ``str`` or ``bytes`` of at
            least :data:`MIN_SECRET_BYTES` bytes that are not all blank. The message never
            shows the secret.
    """
    if secret is None:
        secret = os.environ.get(SECRET_ENV)
    if secret is None or secret in ("", b""):
        raise ConfigurationError(f"No identifier secret: {_HOW_TO}")
    if not isinstance(secret, (str, bytes, bytearray)):
        raise ConfigurationError(
            f"The identifier secret must be a str or bytes, not {type(secret).__name__}: " + _HOW_TO
        )
    try:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    except UnicodeEncodeError:
        raise ConfigurationError(f"The identifier secret is not valid text: {_HOW_TO}") from None
    if len(raw) < MIN_SECRET_BYTES or not raw.strip():
        raise ConfigurationError(
            f"The identifier secret must be at least {MIN_SECRET_BYTES} bytes and not blank: "
            + _HOW_TO
        )
    return raw


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
        InvalidCustomerId: ``customer_id`` is not a usable customer id (a ``ValueError``).
    """
    return safety_identifier(resolve_secret(secret), validate_customer_id(customer_id))
