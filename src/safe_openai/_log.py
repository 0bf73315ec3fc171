"""Where the library's log events go: quiet by default, the application's choice otherwise.

Every module logs through :func:`get_logger` (never ``structlog.get_logger``), with dotted event
names and key-value fields. Each event is routed when it is emitted:

- the application configured structlog (``structlog.is_configured()``): through its processors;
- otherwise: a record of the standard ``logging`` logger ``safe_openai``, at the event's level,
  the fields in the record (``extra``) and in its message, and only if that logger is enabled
  for the level (so a disabled debug event costs two attribute reads and a dict lookup).

An application that configured nothing therefore sees nothing, except warnings and errors that
Python's last-resort handler prints on stderr. ``SAFE_OPENAI_LOG=debug|info|warning`` adds a
readable stderr handler to the ``safe_openai`` logger, like the SDK's ``OPENAI_LOG``. Nothing is
ever written to stdout, and the library never configures structlog or ``logging`` for the
application. A handler, filter or processor that raises never breaks the call that logged.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["ENV_VAR", "Logger", "get_logger", "render"]

#: The environment variable that turns on readable output on stderr.
ENV_VAR = "SAFE_OPENAI_LOG"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

#: Attributes of a ``LogRecord`` a field may not overwrite (``logging`` refuses them in extra).
_RESERVED = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)

#: Called with (level, event, fields) for every event, whatever the log level, when set: the
#: OpenTelemetry module puts events on the span of the call in progress.
event_hook: Callable[[int, str, Mapping[str, Any]], None] | None = None

# The stderr handler SAFE_OPENAI_LOG installed, and its level.
_env_handler: logging.Handler | None = None
_env_level = logging.CRITICAL + 1


def render(event: str, fields: Mapping[str, Any]) -> str:
    """``event key=value ...``: one readable line. Strings with spaces, ``=`` or anything
    unprintable (a newline in a customer id) are quoted and escaped, so one event is one line."""
    parts = [event]
    for key, value in fields.items():
        if (
            isinstance(value, str)
            and value.isprintable()
            and value
            and " " not in value
            and "=" not in value
        ):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


class Logger:
    """The library's logger for one ``logging`` name (``safe_openai`` or a child).

    Methods take the dotted event name and key-value fields, as structlog's do.
    """

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = logging.getLogger(name)

    def debug(self, event: str, **fields: Any) -> None:
        """Log a debug event."""
        self._emit(logging.DEBUG, event, fields, False)

    def info(self, event: str, **fields: Any) -> None:
        """Log an info event."""
        self._emit(logging.INFO, event, fields, False)

    def warning(self, event: str, **fields: Any) -> None:
        """Log a warning event."""
        self._emit(logging.WARNING, event, fields, False)

    def error(self, event: str, **fields: Any) -> None:
        """Log an error event."""
        self._emit(logging.ERROR, event, fields, False)

    def exception(self, event: str, **fields: Any) -> None:
        """Log an error event with the exception being handled."""
        self._emit(logging.ERROR, event, fields, True)

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: bool) -> None:
        try:
            hook = event_hook
            if hook is not None:
                hook(level, event, fields)
            # An application that configured structlog has imported it: the library does not
            # import it itself (import time), and looks for it in sys.modules on each event.
            structlog = sys.modules.get("structlog")
            if structlog is not None and structlog.is_configured():
                self._to_structlog(structlog, level, event, fields, exc_info)
                if level >= _env_level and _env_handler is not None:
                    _env_handler.handle(self._record(level, event, fields, exc_info))
            elif self._logger.isEnabledFor(level):
                self._logger.handle(self._record(level, event, fields, exc_info))
        except Exception:
            # A handler, filter, processor or exporter that raises must not break the call.
            _contained()

    def _to_structlog(
        self,
        structlog: ModuleType,
        level: int,
        event: str,
        fields: dict[str, Any],
        exc_info: bool,
    ) -> None:
        logger = structlog.get_logger(self.name)
        if exc_info:
            logger.exception(event, **fields)
        else:
            getattr(logger, logging.getLevelName(level).lower())(event, **fields)

    def _record(
        self, level: int, event: str, fields: Mapping[str, Any], exc_info: bool
    ) -> logging.LogRecord:
        caller = sys._getframe(3)  # _record <- _emit <- info() <- the code that logged
        record = self._logger.makeRecord(
            self.name,
            level,
            caller.f_code.co_filename,
            caller.f_lineno,
            render(event, fields),
            (),
            sys.exc_info() if exc_info else None,
            caller.f_code.co_name,
        )
        record.event = event
        for key, value in fields.items():
            setattr(record, f"{key}_" if key in _RESERVED else key, value)
        return record


def _contained() -> None:
    """Say once on stderr that a log handler failed; later failures pass silently."""
    global _failed_once
    if _failed_once:
        return
    _failed_once = True
    try:
        kind = type(sys.exc_info()[1]).__name__
        sys.stderr.write(f"safe_openai: a log handler or processor raised {kind}; ignored\n")
    except Exception:
        pass


_failed_once = False

_loggers: dict[str, Logger] = {}


def get_logger(name: str = "safe_openai") -> Logger:
    """The library's logger named ``name`` (a child of ``safe_openai``)."""
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers[name] = Logger(name)
    return logger


def _setup_from_env() -> None:
    """Honour ``SAFE_OPENAI_LOG``: a readable stderr handler on the ``safe_openai`` logger."""
    global _env_handler, _env_level
    level = _LEVELS.get(os.environ.get(ENV_VAR, "").strip().lower())
    if level is None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s - %(name)s:%(lineno)d - %(levelname)s] %(message)s")
    )
    handler.setLevel(level)
    logger = logging.getLogger("safe_openai")
    logger.addHandler(handler)
    logger.setLevel(level)
    _env_handler, _env_level = handler, level


_setup_from_env()
