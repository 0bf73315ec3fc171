"""A local, durable spool for usage records and violations the store could not take.

When the usage store is unreachable, a call that already reached the model must still be
billed to its customer, and a blocked call must still count against its customer's strikes.
:class:`Spool` keeps such records and violations on local disk until :meth:`Spool.drain` (or
:meth:`Spool.adrain`) writes them to the store::

    spool = Spool()
    try:
        store.commit(reservation, record)
    except StoreError:
        spool.append(record, reservation.id)
    ...
    spool.drain(store)          # later, e.g. on a timer or at start-up

Files, all in one directory:

- ``<host>-<pid>-<random>.jsonl``: one file per :class:`Spool` object (so per process), one
  JSON line per record or violation, each line flushed and fsynced before
  :meth:`Spool.append` (or :meth:`Spool.append_violation`) returns.
  A line torn by a crash mid-append was never acknowledged and is skipped.
- ``*.draining``: files claimed by a drain. A drain renames every ``.jsonl`` file (an atomic
  claim), writes their records and deletes each file once all its records are written. After
  a crash the next drain picks the ``.draining`` files up again; the stores ignore a repeated
  ``record_id`` (``violation_id`` for violations), so what was written before the crash is not
  counted twice.
- ``append.lock`` and ``drain.lock`` (``fcntl`` locks, released by the OS when a process dies):
  appends hold the first shared, a drain takes it exclusive only while renaming, so no record
  is appended to a file being claimed; one drain at a time holds the second.

On platforms without ``fcntl`` (Windows) the locks are skipped: give each process its own
spool directory there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._log import get_logger
from ..errors import StoreError
from ..usage import UsageRecord
from ._types import Reservation, Violation

if TYPE_CHECKING:
    from . import AsyncUsageStore, UsageStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Spool", "default_spool_dir"]

log = get_logger()

_SPOOLED = ".jsonl"
_DRAINING = ".draining"
_FORMAT = 1


def default_spool_dir() -> Path:
    """``SAFE_OPENAI_SPOOL_DIR`` when set, else ``safe-openai/spool`` in the user cache dir."""
    configured = os.environ.get("SAFE_OPENAI_SPOOL_DIR")
    if configured:
        return Path(configured)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "safe-openai" / "spool"


def _fsync_dir(directory: Path) -> None:
    """Make a created, renamed or deleted directory entry itself durable."""
    if sys.platform == "win32":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, *, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """Hold an ``fcntl`` lock on ``path``; yields whether it was acquired."""
    if fcntl is None:  # pragma: no cover - Windows
        yield True
        return
    with open(path, "a+b") as handle:
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not blocking:
            flags |= fcntl.LOCK_NB
        try:
            fcntl.flock(handle.fileno(), flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _line(data: dict[str, Any]) -> bytes:
    line = json.dumps({"v": _FORMAT, **data}, separators=(",", ":"))
    # The leading newline ends any line a crash tore mid-write, so the torn fragment can never
    # swallow this record; empty lines are skipped when reading.
    return b"\n" + line.encode() + b"\n"


def _encode(record: UsageRecord, reservation_id: str | None) -> bytes:
    return _line({"record": record.to_dict(), "reservation_id": reservation_id})


def _violation_dict(violation: Violation) -> dict[str, Any]:
    return {
        "customer_id": violation.customer_id,
        "created_at": violation.created_at.isoformat(),
        "source": violation.source,
        "categories": list(violation.categories),
        "top_score": violation.top_score,
        "endpoint": violation.endpoint,
        "detail": violation.detail,
        "violation_id": violation.violation_id,
        "strike": violation.strike,
    }


def _violation_from_dict(data: dict[str, Any]) -> Violation:
    return Violation(
        customer_id=str(data["customer_id"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        source=str(data["source"]),
        categories=tuple(str(c) for c in data["categories"]),
        top_score=None if data["top_score"] is None else float(data["top_score"]),
        endpoint=None if data["endpoint"] is None else str(data["endpoint"]),
        detail=str(data["detail"]),
        violation_id=str(data["violation_id"]),
        # lines spooled before the flag existed were all strikes
        strike=bool(data.get("strike", True)),
    )


@dataclass(frozen=True)
class _Write:
    record: UsageRecord
    reservation_id: str | None


@dataclass(frozen=True)
class _WriteViolation:
    violation: Violation


def _decode(line: bytes) -> _Write | _WriteViolation | None:
    try:
        data = json.loads(line)
        if "violation" in data:
            return _WriteViolation(_violation_from_dict(data["violation"]))
        return _Write(UsageRecord.from_dict(data["record"]), data.get("reservation_id") or None)
    except (ValueError, LookupError, TypeError, AttributeError):
        return None


class _Claimed:
    """The lines of one file claimed by a drain, and how to give back the ones not written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = [line for line in path.read_bytes().splitlines() if line.strip()]

    def keep_from(self, index: int) -> None:
        """Keep lines ``index:`` for a later drain (atomically); delete the file if none."""
        rest = self.lines[index:]
        if not rest:
            self.path.unlink(missing_ok=True)
        else:
            temporary = self.path.with_name(self.path.name + ".tmp")
            with open(temporary, "wb") as handle:
                handle.write(b"".join(line + b"\n" for line in rest))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        _fsync_dir(self.path.parent)


@dataclass(frozen=True)
class _Keep:
    claimed: _Claimed
    index: int


def _drain_plan(
    claimed: list[_Claimed],
) -> Generator[_Write | _WriteViolation | _Keep, bool, int]:
    """The steps of a drain, shared by the sync and async drivers.

    Yields a :class:`_Write` per record (a :class:`_WriteViolation` per violation) and receives
    whether the store took it; yields a :class:`_Keep` when a file is done (or the store
    failed) to drop what was written. Returns how many records and violations were written.
    """
    written = 0
    for batch in claimed:
        for index, line in enumerate(batch.lines):
            item = _decode(line)
            if item is None:
                # a line torn by a crash during append: that append never returned
                log.warning("safe_openai.spool_line_skipped", file=batch.path.name)
                continue
            if not (yield item):
                yield _Keep(batch, index)
                return written
            written += 1
        yield _Keep(batch, len(batch.lines))
    return written


class Spool:
    """Usage records and violations kept on local disk until the store can take them.

    Safe for several threads and several processes on one directory, and across restarts: a
    new :class:`Spool` on the same directory sees every record an earlier one appended.

    Args:
        directory: Where to keep the files. Defaults to :func:`default_spool_dir`.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        # created on the first append: opening a client must not touch the disk
        self.directory = Path(directory) if directory is not None else default_spool_dir()
        self._append_lock = self.directory / "append.lock"
        self._drain_lock = self.directory / "drain.lock"
        self._thread_lock = threading.Lock()
        self._pid = -1
        self._path = self.directory / "unset"

    def _own_file(self) -> Path:
        # one file per process: a forked child gets its own instead of sharing its parent's
        if self._pid != os.getpid():
            self._pid = os.getpid()
            host = socket.gethostname().replace(os.sep, "_") or "host"
            self._path = self.directory / f"{host}-{self._pid}-{uuid.uuid4().hex[:12]}{_SPOOLED}"
        return self._path

    def append(self, record: UsageRecord, reservation_id: str | None = None) -> None:
        """Keep ``record`` on disk; it is durable (fsynced) when this returns.

        Args:
            record: The usage record the store did not take.
            reservation_id: The reservation it settles, so the drain commits it (dropping the
                pending hold) instead of adding it as a plain record.

        Raises:
            OSError: The record could not be written to disk.
        """
        if not record.record_id:
            # a drain may replay a record; its id is what makes the replay harmless
            record = UsageRecord.from_dict({**record.to_dict(), "record_id": uuid.uuid4().hex})
        self._append_line(_encode(record, reservation_id))

    def append_violation(self, violation: Violation) -> None:
        """Keep a violation on disk; it is durable (fsynced) when this returns.

        Args:
            violation: The violation the store did not take. Give it a ``violation_id`` so a
                replay stores it once; one without an id gets one here.

        Raises:
            OSError: The violation could not be written to disk.
        """
        if not violation.violation_id:
            violation = replace(violation, violation_id=uuid.uuid4().hex)
        self._append_line(_line({"violation": _violation_dict(violation)}))

    def _append_line(self, line: bytes) -> None:
        if self._pid != os.getpid():
            self.directory.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, _locked(self._append_lock, exclusive=False):
            path = self._own_file()
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.directory)

    def __bool__(self) -> bool:
        # a spool is a service, not a container: an empty one is still there to use
        return True

    def waiting(self) -> bool:
        """Whether any records wait to be written (a directory listing; no file is read)."""
        return bool(self._files(_SPOOLED, _DRAINING))

    def __len__(self) -> int:
        """How many records and violations are waiting (spooled, or claimed by a drain not yet
        finished)."""
        count = 0
        for path in self._files(_SPOOLED, _DRAINING):
            with contextlib.suppress(FileNotFoundError):
                count += sum(1 for line in path.read_bytes().splitlines() if _decode(line))
        return count

    def _files(self, *suffixes: str) -> list[Path]:
        """Files with one of ``suffixes``, oldest first."""
        found: list[tuple[float, str, Path]] = []
        if not self.directory.is_dir():
            return []
        for path in self.directory.iterdir():
            if path.suffix in suffixes:
                with contextlib.suppress(FileNotFoundError):  # a drain removed it meanwhile
                    found.append((path.stat().st_mtime, path.name, path))
        return [path for _, _, path in sorted(found)]

    def _claim(self) -> list[_Claimed]:
        """Claim every spooled file, plus any a crashed drain left (the caller holds the lock)."""
        with _locked(self._append_lock, exclusive=True):
            for path in self._files(_SPOOLED):
                # a fresh name each time: a file of the same process may still be half drained
                path.rename(path.with_name(f"{path.stem}-{uuid.uuid4().hex[:8]}{_DRAINING}"))
        _fsync_dir(self.directory)
        return [_Claimed(path) for path in self._files(_DRAINING)]

    def drain(
        self, store: UsageStore, *, on_violation: Callable[[Violation], object] | None = None
    ) -> int:
        """Write every spooled record and violation to ``store`` and remove the ones written.

        Records with a reservation id are committed against it, the others recorded; both are
        idempotent by ``record_id``. Violations are recorded, idempotent by ``violation_id``.
        Stops at the first :class:`~safe_openai.StoreError`, keeping that record and the rest.
        If another process or thread is draining this directory right now, returns 0 at once:
        that drain writes the records.

        Args:
            store: Where to write.
            on_violation: Called after each violation is written (the client applies the
                strike rule there); a :class:`~safe_openai.StoreError` it raises stops the
                drain as a failed write does, keeping the violation for the next drain.

        Returns:
            How many records and violations were written.
        """
        if not self.directory.is_dir():
            return 0
        with _locked(self._drain_lock, exclusive=True, blocking=False) as mine:
            if not mine:
                return 0
            plan = _drain_plan(self._claim())
            try:
                step = next(plan)
                while True:
                    if isinstance(step, _Keep):
                        step.claimed.keep_from(step.index)
                        step = plan.send(True)
                        continue
                    try:
                        _write(store, step, on_violation)
                    except StoreError as exc:
                        log.warning("safe_openai.spool_drain_stopped", error=type(exc).__name__)
                        step = plan.send(False)
                    else:
                        step = plan.send(True)
            except StopIteration as done:
                written: int = done.value
                return written

    async def adrain(
        self,
        store: AsyncUsageStore,
        *,
        on_violation: Callable[[Violation], Awaitable[object]] | None = None,
    ) -> int:
        """The async twin of :meth:`drain`; file work runs in a worker thread.

        Returns:
            How many records and violations were written.
        """
        if not self.directory.is_dir():
            return 0
        with _locked(self._drain_lock, exclusive=True, blocking=False) as mine:
            if not mine:
                return 0
            plan = _drain_plan(await asyncio.to_thread(self._claim))
            try:
                step = next(plan)
                while True:
                    if isinstance(step, _Keep):
                        await asyncio.to_thread(step.claimed.keep_from, step.index)
                        step = plan.send(True)
                        continue
                    try:
                        await _awrite(store, step, on_violation)
                    except StoreError as exc:
                        log.warning("safe_openai.spool_drain_stopped", error=type(exc).__name__)
                        step = plan.send(False)
                    else:
                        step = plan.send(True)
            except StopIteration as done:
                written: int = done.value
                return written


def _write(
    store: UsageStore,
    step: _Write | _WriteViolation,
    on_violation: Callable[[Violation], object] | None,
) -> None:
    if isinstance(step, _WriteViolation):
        store.record_violation(step.violation)
        if on_violation is not None:
            on_violation(step.violation)
    elif step.reservation_id:
        store.commit(Reservation(step.reservation_id, step.record.customer_id, True), step.record)
    else:
        store.record_usage(step.record)


async def _awrite(
    store: AsyncUsageStore,
    step: _Write | _WriteViolation,
    on_violation: Callable[[Violation], Awaitable[object]] | None,
) -> None:
    if isinstance(step, _WriteViolation):
        await store.record_violation(step.violation)
        if on_violation is not None:
            await on_violation(step.violation)
    elif step.reservation_id:
        reservation = Reservation(step.reservation_id, step.record.customer_id, True)
        await store.commit(reservation, step.record)
    else:
        await store.record_usage(step.record)
