"""Alerts: what an operator should hear about a customer, as it happens, once.

The guard raises an :class:`Alert` when a customer crosses a soft limit
(:attr:`Policy.soft_limits <safe_openai.Policy.soft_limits>`), is refused by a quota, gets a
strike or is suspended, and when an OpenAI safety webhook (a warning, a deactivation, a blocked
identifier) is traced to a customer. Each alert has a stable :attr:`Alert.id`, claimed in the
usage store before it is handed on, so one event fires once however many processes or hosts
share the store. The policy receives it in one hook, :meth:`Policy.on_alert
<safe_openai.Policy.on_alert>`, which by default hands it to each of its ``alert_sinks``.

A sink is any callable taking an :class:`Alert`. :class:`WebhookAlertSink` posts each alert as
JSON to a URL, signed with a shared secret, retried with exponential backoff, from a background
thread: the guarded call only puts the alert in a bounded queue.

Signature (what a receiver checks; :func:`verify_alert_signature` does it)::

    X-Safe-OpenAI-Alert-Id:  the alert's id (also in the body; percent-encoded beyond
                             printable ASCII)
    X-Safe-OpenAI-Timestamp: seconds since the epoch when this attempt was sent
    X-Safe-OpenAI-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>" under the secret>
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import json
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, cast, get_args
from urllib.parse import quote

import httpx2
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from ._log import get_logger
from .errors import ConfigurationError, WebhookVerificationError

__all__ = [
    "ALERT_KINDS",
    "EXIT_TIMEOUT",
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Alert",
    "AlertKind",
    "AlertSink",
    "WebhookAlertSink",
    "sign_alert",
    "verify_alert_signature",
]

log = get_logger()

#: What an alert is about.
AlertKind = Literal["soft_limit", "quota_exceeded", "strike", "suspension", "openai_event"]
ALERT_KINDS: tuple[AlertKind, ...] = get_args(AlertKind)

#: Seconds a sink with alerts still queued at interpreter exit goes on delivering them.
EXIT_TIMEOUT = 5.0

ID_HEADER = "X-Safe-OpenAI-Alert-Id"
TIMESTAMP_HEADER = "X-Safe-OpenAI-Timestamp"
SIGNATURE_HEADER = "X-Safe-OpenAI-Signature"


@dataclass(frozen=True, slots=True)
class Alert:
    """One event an operator should hear about.

    Attributes:
        id: Stable across processes: the same event has the same id, and fires once. Soft
            limits ``alert:soft_limit:<customer>:<limit>:<threshold>:<window>`` (the window is
            the UTC hour ``2026-12-04T19`` of a minute limit, the day ``2026-12-04`` or month
            ``2026-12`` of the others, the usage counted in), quota refusals
            ``alert:quota_exceeded:<customer>:<limit>:<window>``,
            strikes ``alert:strike:<violation id>``, suspensions
            ``alert:suspension:<customer>:<since>``, OpenAI events
            ``alert:openai_event:<event id>``.
        kind: ``"soft_limit"``, ``"quota_exceeded"``, ``"strike"``, ``"suspension"`` or
            ``"openai_event"``.
        customer_id: The customer.
        at: When the event happened (UTC).
        limit: The quota limit (``"tokens_per_day"``, ...) of a soft limit or refusal.
        used: What the limit counted: after the call that reached a soft limit, before the
            refused call's demand for a refusal.
        allowed: The limit's value.
        threshold: The soft limit's fraction of ``allowed`` (``0.8``).
        categories: The moderation categories of a strike (or the OpenAI event's category).
        event_type: The OpenAI webhook event type, or the violation's source of a strike.
        reason: One plain sentence: why.
    """

    id: str
    kind: AlertKind
    customer_id: str
    at: datetime
    limit: str | None = None
    used: float | None = None
    allowed: float | None = None
    threshold: float | None = None
    categories: tuple[str, ...] = ()
    event_type: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The alert as plain JSON types (``at`` an ISO 8601 string)."""
        data = asdict(self)
        data["at"] = self.at.astimezone(timezone.utc).isoformat()
        data["categories"] = list(self.categories)
        return data

    def to_json(self) -> str:
        """The alert as compact JSON, every field present (``null`` when unset)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Alert:
        """Read an alert back from :meth:`to_json` (what a receiver gets).

        Raises:
            ValueError: ``text`` is not an alert.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("kind") not in ALERT_KINDS:
            raise ValueError("not a safe-openai alert")
        return cls(
            id=str(data["id"]),
            kind=cast("AlertKind", data["kind"]),
            customer_id=str(data["customer_id"]),
            at=datetime.fromisoformat(data["at"]),
            limit=data.get("limit"),
            used=data.get("used"),
            allowed=data.get("allowed"),
            threshold=data.get("threshold"),
            categories=tuple(data.get("categories") or ()),
            event_type=data.get("event_type"),
            reason=str(data.get("reason") or ""),
        )


class AlertSink(Protocol):
    """Anything that takes alerts: a callable of one :class:`Alert`. It must not block (hand
    the alert to a queue, as :class:`WebhookAlertSink` does): it runs inside guarded calls."""

    def __call__(self, alert: Alert) -> object: ...


def sign_alert(body: bytes, *, secret: str, timestamp: int) -> str:
    """The :data:`SIGNATURE_HEADER` value of ``body`` sent at ``timestamp``."""
    message = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify_alert_signature(
    body: bytes | str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | Any,
    *,
    secret: str,
    tolerance: float = 300.0,
    now: float | None = None,
) -> Alert:
    """Check a delivery of :class:`WebhookAlertSink` and return its alert.

    Args:
        body: The raw request body, exactly as received.
        headers: The request headers (a dict, Starlette's or Werkzeug's headers, or pairs);
            names are matched case-insensitively.
        secret: The secret the sink was given.
        tolerance: How many seconds the timestamp may be off this host's clock (a replayed
            delivery older than that is refused).
        now: The current time in seconds since the epoch (default: this host's clock).

    Raises:
        WebhookVerificationError: A header is missing, the timestamp is too old or too new,
            the signature does not match, or the body is not an alert.
        ConfigurationError: ``secret`` is shorter than 16 characters (an empty secret from an
            unset environment variable would accept a signature anyone can make).
    """
    _check_secret(secret)
    for name, value in (("tolerance", tolerance), ("now", now)):
        # a NaN compares false with everything: `abs(current - sent) > nan` accepted any replay
        bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
        if value is not None and (bad_type or not math.isfinite(value)):
            raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
    if tolerance < 0:
        raise ConfigurationError(f"tolerance must be >= 0 seconds, got {tolerance!r}")
    try:
        pairs = headers.items() if hasattr(headers, "items") else headers
        flat = {str(name).lower(): str(value) for name, value in pairs}
    except (TypeError, ValueError):
        raise WebhookVerificationError(
            "Alert delivery rejected: the headers are not a mapping or name/value pairs."
        ) from None
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp, signature = flat.get(TIMESTAMP_HEADER.lower()), flat.get(SIGNATURE_HEADER.lower())
    if not timestamp or not signature:
        raise WebhookVerificationError("Alert delivery rejected: a signature header is missing.")
    try:
        sent = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("Alert delivery rejected: bad timestamp.") from None
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance:
        raise WebhookVerificationError("Alert delivery rejected: the timestamp is out of range.")
    expected = sign_alert(raw, secret=secret, timestamp=sent)
    # bytes, not str: compare_digest refuses a str that is not ASCII (a forged header)
    given = [part.strip().encode("utf-8", "surrogateescape") for part in signature.split(",")]
    if not any(hmac.compare_digest(expected.encode(), part) for part in given):
        raise WebhookVerificationError("Alert delivery rejected: the signature does not match.")
    try:
        return Alert.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise WebhookVerificationError("Alert delivery rejected: the body is no alert.") from exc


def _check_secret(secret: object) -> None:
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigurationError("an alert signing secret must be at least 16 characters")


#: What an HTTP header value may hold as it is; anything else in an alert id (a customer id
#: that is not ASCII, a control character) is percent-encoded in :data:`ID_HEADER`.
_HEADER_SAFE = "".join(chr(code) for code in range(0x21, 0x7F))


class _Retry(Exception):
    """An attempt worth repeating (a connection error, a timeout, 408, 429 or a 5xx)."""


@dataclass
class _Worker:
    """The per-process part of a sink: its queue, thread and HTTP client (rebuilt after fork)."""

    pid: int
    queue: queue.Queue[Alert | None]
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(default_factory=threading.Condition)
    pending: int = 0
    thread: threading.Thread | None = None


class WebhookAlertSink:
    """Posts each alert as JSON to ``url``, signed, retried, never blocking the guarded call.

    Calling the sink puts the alert in a bounded queue; one daemon thread posts it with the
    SDK's own HTTP stack (``httpx2``). An attempt that fails with a connection error, a timeout,
    408, 429 or a 5xx is retried with exponential backoff and jitter, up to ``attempts`` in all,
    each signed afresh (see the module docstring for the headers). Another 4xx, or a redirect
    (never followed: the signed body goes to ``url`` only), is not retried.
    A full queue drops the alert with a ``safe_openai.alert_dropped`` warning and counts it
    (:attr:`dropped`). The thread starts with the first alert, and again in a forked child
    (which drops what the parent had queued: the parent delivers it). At interpreter exit, a
    sink not closed that still has alerts queued delivers them for up to
    :data:`EXIT_TIMEOUT` seconds, then logs ``safe_openai.alerts_undelivered`` with how many
    were left (its thread is a daemon: a receiver that is down never holds up the exit longer).

    Args:
        url: Where to post (``https://ops.example.com/hooks/safe-openai``).
        secret: The shared secret of the signature (at least 16 characters).
        timeout: Seconds each attempt may take.
        attempts: Attempts per alert, the first included.
        max_queue: Alerts waiting at most; beyond that new ones are dropped.
        backoff: The first retry's wait in seconds; it doubles up to ``max_backoff``.
        max_backoff: The longest wait between attempts.
        transport: An ``httpx2`` transport (tests, proxies); default: a plain HTTP transport.

    Raises:
        ConfigurationError: A setting is out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str,
        timeout: float = 5.0,
        attempts: int = 5,
        max_queue: int = 1000,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx2.BaseTransport | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"WebhookAlertSink needs an http(s) URL, got {url!r}")
        _check_secret(secret)
        for name, value in (("timeout", timeout), ("backoff", backoff)):
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(max_backoff, (int, float)) or not max_backoff >= backoff:
            raise ConfigurationError(f"max_backoff must be >= backoff, got {max_backoff!r}")
        for name, count in (("attempts", attempts), ("max_queue", max_queue)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigurationError(f"{name} must be a whole number >= 1, got {count!r}")
        self.url = url
        self._secret = secret
        self._timeout = float(timeout)
        self._attempts = attempts
        self._max_queue = max_queue
        self._wait = wait_exponential(multiplier=backoff, max=max_backoff) + wait_random(
            0, backoff / 2
        )
        self._transport = transport
        self._stop = threading.Event()
        self._closed = False
        self._guard = threading.Lock()
        self._worker: _Worker | None = None
        #: Alerts dropped because the queue was full or the sink closed.
        self.dropped = 0
        #: Alerts the receiver accepted (a 2xx).
        self.delivered = 0
        #: Alerts given up on: after their last attempt, refused with a 4xx or redirected.
        self.failed = 0

    def __repr__(self) -> str:
        return f"WebhookAlertSink({self.url!r})"

    # --- the guarded call's side: never blocks ---------------------------------------------

    def __call__(self, alert: Alert) -> None:
        """Queue ``alert`` for delivery; returns at once (a full queue drops it, logged)."""
        if self._closed:
            self._drop(alert, "closed")
            return
        worker = self._current()
        with worker.idle:
            worker.pending += 1
        try:
            worker.queue.put_nowait(alert)
        except queue.Full:
            with worker.idle:
                worker.pending -= 1
                worker.idle.notify_all()
            self._drop(alert, "queue_full")

    send = __call__

    def _drop(self, alert: Alert, reason: str) -> None:
        with self._guard:
            self.dropped += 1
        log.warning(
            "safe_openai.alert_dropped",
            alert_id=alert.id,
            kind=alert.kind,
            customer_id=alert.customer_id,
            reason=reason,
            dropped=self.dropped,
        )

    def _current(self) -> _Worker:
        pid = os.getpid()
        worker = self._worker
        if (
            worker is not None
            and worker.pid == pid
            and worker.thread is not None
            and worker.thread.is_alive()
        ):
            return worker
        with self._guard:
            worker = self._worker
            if worker is None or worker.pid != pid:
                # a forked child starts empty: what the parent queued is the parent's to send
                worker = self._worker = _Worker(pid, queue.Queue(self._max_queue))
            if worker.thread is None or not worker.thread.is_alive():
                worker.thread = threading.Thread(
                    target=self._run, args=(worker,), name="safe-openai-alerts", daemon=True
                )
                worker.thread.start()
                _LIVE.add(self)
            return worker

    # --- the worker thread -------------------------------------------------------------------

    def _run(self, worker: _Worker) -> None:
        with httpx2.Client(timeout=self._timeout, transport=self._transport) as http:
            while True:
                alert = worker.queue.get()
                if alert is None:
                    return
                try:
                    self._deliver(http, alert)
                except Exception:  # never let one alert end the thread
                    with self._guard:
                        self.failed += 1
                    log.exception(
                        "safe_openai.alert_failed",
                        alert_id=alert.id,
                        kind=alert.kind,
                        customer_id=alert.customer_id,
                    )
                finally:
                    with worker.idle:
                        worker.pending -= 1
                        worker.idle.notify_all()

    def _deliver(self, http: httpx2.Client, alert: Alert) -> None:
        body = alert.to_json().encode()

        def attempt() -> None:
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "safe-openai-alerts",
                ID_HEADER: quote(alert.id, safe=_HEADER_SAFE),
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign_alert(body, secret=self._secret, timestamp=timestamp),
            }
            try:
                response = http.post(self.url, content=body, headers=headers)
            except httpx2.TransportError as exc:
                raise _Retry(type(exc).__name__) from exc
            status = response.status_code
            if status >= 500 or status in (408, 429):
                raise _Retry(f"HTTP {status}")
            if not 200 <= status < 300:
                # a redirect is not followed (the signed body stays with the configured URL)
                # and is no delivery: given up on, like a 4xx
                moved = f" to {response.headers.get('location')}" if status < 400 else ""
                raise httpx2.HTTPStatusError(
                    f"HTTP {status}{moved}", request=response.request, response=response
                )

        def sleep(seconds: float) -> None:
            self._stop.wait(seconds)  # closing ends the wait, and the stop ends the retries

        retrying = Retrying(
            stop=stop_after_attempt(self._attempts) | stop_when_event_set(self._stop),
            wait=self._wait,
            retry=retry_if_exception_type(_Retry),
            sleep=sleep,
            before_sleep=lambda state: log.info(
                "safe_openai.alert_retry", alert_id=alert.id, attempt=state.attempt_number
            ),
            reraise=True,
        )
        try:
            retrying(attempt)
        except (_Retry, httpx2.HTTPStatusError) as exc:
            with self._guard:
                self.failed += 1
            log.error(
                "safe_openai.alert_failed",
                alert_id=alert.id,
                kind=alert.kind,
                customer_id=alert.customer_id,
                error=str(exc),
            )
            return
        with self._guard:
            self.delivered += 1
        log.debug("safe_openai.alert_delivered", alert_id=alert.id, kind=alert.kind)

    # --- lifecycle ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued alert is delivered or given up on; whether that happened
        within ``timeout`` seconds (``None``: wait as long as it takes)."""
        worker = self._worker
        if worker is None or worker.pid != os.getpid():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with worker.idle:
            while worker.pending > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                worker.idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking alerts, deliver what is queued for up to ``timeout`` seconds, then stop
        the thread (what is left is dropped: retries stop waiting)."""
        self._closed = True
        self.flush(timeout)
        self._stop.set()
        worker = self._worker
        if worker is not None and worker.pid == os.getpid() and worker.thread is not None:
            with contextlib.suppress(queue.Full):
                worker.queue.put_nowait(None)
            worker.thread.join(1.0)

    def _at_exit(self) -> None:
        worker = self._worker
        if self._closed or worker is None or worker.pid != os.getpid() or worker.pending <= 0:
            return
        if not self.flush(EXIT_TIMEOUT):
            log.warning("safe_openai.alerts_undelivered", url=self.url, pending=worker.pending)
        self.close(0)

    def __enter__(self) -> WebhookAlertSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: Sinks whose thread started in this process, for the exit hook (weakly: a sink dropped by the
#: application is not kept alive).
_LIVE: weakref.WeakSet[WebhookAlertSink] = weakref.WeakSet()


@atexit.register
def _deliver_at_exit() -> None:
    for sink in list(_LIVE):
        sink._at_exit()
