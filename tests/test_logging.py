"""Logging: silent by default, the standard ``logging`` module or structlog when the application
configured one, ``SAFE_OPENAI_LOG`` for a quick look. The process-level cases run in a fresh
interpreter, so nothing configured by other tests leaks in.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from safe_openai import CustomerSuspended, ModerationBlocked, _log
from safe_openai._log import get_logger, render
from safe_openai.testing import FakeOpenAI

from .conftest import make_client

# An application: a clean call, a blocked one and a refused one (suspended customer), each
# followed by its own line on stdout. SETUP is put in front of it by each test.
APP = """
from safe_openai import SafeClient, ModerationBlocked, CustomerSuspended
from safe_openai.testing import FakeOpenAI

fake = FakeOpenAI()
client = SafeClient(**fake.openai_kwargs(), identifier_secret="test-identifier-secret", store="memory://", spool=False)
acme = client.for_customer("acme")
reply = acme.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
)
print("app: clean", reply.choices[0].message.content)
try:
    acme.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "I will kill you"}]
    )
except ModerationBlocked:
    print("app: blocked")
client.suspend("globex", reason="testing")
try:
    client.for_customer("globex").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
except CustomerSuspended:
    print("app: refused")
"""

APP_OUTPUT = "app: clean Echo: hello\napp: blocked\napp: refused\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in its own working directory (the apps write what they saw there)."""
    monkeypatch.chdir(tmp_path)


def run_app(
    setup: str = "", *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    source = textwrap.dedent(setup) + APP
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_OPENAI_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=False,
    )


def test_an_unconfigured_app_sees_only_its_own_output_on_stdout() -> None:
    """Nothing from the library on stdout; stderr has no info or debug events."""
    done = run_app()
    assert done.returncode == 0, done.stderr
    assert done.stdout == APP_OUTPUT
    for quiet in ("safe_openai.request_tagged", "safe_openai.request_allowed", "usage_recorded"):
        assert quiet not in done.stderr
    # warnings reach stderr as Python's last-resort handler shows them, one line each
    lines = done.stderr.splitlines()
    assert any(line.startswith("safe_openai.request_blocked customer_id=acme") for line in lines)
    assert "I will kill you" not in done.stderr


def test_an_app_on_standard_logging_gets_records_naming_the_customer() -> None:
    setup = """
    import json, logging

    class Collect(logging.Handler):
        def emit(self, record):
            if record.name.startswith("safe_openai"):
                seen.append(record)

    seen = []
    logging.basicConfig(level=logging.DEBUG, handlers=[Collect()])
    import atexit

    @atexit.register
    def dump():
        rows = [
            {"name": r.name, "level": r.levelname, "event": r.event,
             "customer_id": getattr(r, "customer_id", None), "message": r.getMessage()}
            for r in seen
        ]
        with open("records.json", "w") as out:
            json.dump(rows, out)
    """
    done = run_app(setup)
    assert done.returncode == 0, done.stderr
    assert done.stdout == APP_OUTPUT
    rows = json.loads(Path("records.json").read_text())
    events = {(r["event"], r["level"], r["customer_id"]) for r in rows}
    assert ("safe_openai.request_allowed", "DEBUG", "acme") in events
    assert ("safe_openai.usage_recorded", "INFO", "acme") in events
    assert ("safe_openai.request_blocked", "WARNING", "acme") in events
    assert ("safe_openai.request_refused", "INFO", "globex") in events
    assert all(r["name"] == "safe_openai" for r in rows)
    blocked = next(r for r in rows if r["event"] == "safe_openai.request_blocked")
    assert blocked["message"].startswith("safe_openai.request_blocked customer_id=acme")
    assert "kill" not in json.dumps(rows)


def test_an_app_on_structlog_gets_the_events_through_its_processors() -> None:
    setup = """
    import json, structlog

    seen = []

    def collect(logger, method, event_dict):
        seen.append({"event": event_dict["event"], "method": method,
                     "customer_id": event_dict.get("customer_id")})
        raise structlog.DropEvent

    structlog.configure(processors=[collect])
    import atexit
    atexit.register(lambda: open("events.json", "w").write(json.dumps(seen)))
    """
    done = run_app(setup)
    assert done.returncode == 0, done.stderr
    assert done.stdout == APP_OUTPUT
    seen = json.loads(Path("events.json").read_text())
    assert {
        "event": "safe_openai.request_allowed",
        "method": "debug",
        "customer_id": "acme",
    } in seen
    assert {
        "event": "safe_openai.request_blocked",
        "method": "warning",
        "customer_id": "acme",
    } in seen
    assert "safe_openai" not in done.stderr  # structlog took them; the stdlib path stayed quiet


@pytest.mark.parametrize(
    ("level", "shown", "hidden"),
    [
        ("debug", ["DEBUG] safe_openai.request_allowed", "INFO] safe_openai.usage_recorded"], []),
        ("info", ["INFO] safe_openai.usage_recorded"], ["DEBUG]"]),
        ("warning", ["WARNING] safe_openai.request_blocked"], ["DEBUG]", "INFO]"]),
    ],
)
def test_safe_openai_log_prints_readable_lines_on_stderr(
    level: str, shown: list[str], hidden: list[str]
) -> None:
    done = run_app(env={"SAFE_OPENAI_LOG": level})
    assert done.returncode == 0, done.stderr
    assert done.stdout == APP_OUTPUT
    for text in shown:
        assert text in done.stderr
    for text in hidden:
        assert text not in done.stderr
    assert "customer_id=acme" in done.stderr


def test_safe_openai_log_also_prints_when_structlog_is_configured() -> None:
    setup = """
    import structlog
    structlog.configure(processors=[lambda *a: (_ for _ in ()).throw(structlog.DropEvent)])
    """
    done = run_app(setup, env={"SAFE_OPENAI_LOG": "debug"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == APP_OUTPUT
    assert "DEBUG] safe_openai.request_allowed customer_id=acme" in done.stderr


def test_the_library_configures_neither_logging_nor_structlog() -> None:
    setup = """
    import atexit, logging, structlog

    @atexit.register
    def check():
        assert not logging.getLogger().handlers, logging.getLogger().handlers
        assert not structlog.is_configured()
        print("app: unconfigured")
    """
    done = run_app(setup)
    assert done.returncode == 0, done.stderr
    assert done.stdout == APP_OUTPUT + "app: unconfigured\n"


def test_fields_are_in_the_record_and_setlevel_filters(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="safe_openai")
    with make_client(fake) as client:
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    [usage] = [r for r in caplog.records if getattr(r, "event", "") == "safe_openai.usage_recorded"]
    assert (usage.customer_id, usage.model, usage.outcome) == ("acme", "gpt-4o-mini", "ok")  # type: ignore[attr-defined]
    assert usage.levelno == logging.INFO and usage.name == "safe_openai"
    assert usage.funcName == "finish" and usage.pathname.endswith("_guard.py")
    assert not [r for r in caplog.records if r.levelno < logging.INFO]

    caplog.clear()
    logging.getLogger("safe_openai").setLevel(logging.WARNING)
    with make_client(fake) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "kill"}]
        )
    assert [r.event for r in caplog.records] == ["safe_openai.request_blocked"]  # type: ignore[attr-defined]


def test_a_field_named_like_a_record_attribute_is_kept_beside_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="safe_openai")
    get_logger().warning("safe_openai.probe", name="x", module="m", message="hi")
    [record] = caplog.records
    assert (record.name, record.name_, record.module_, record.message_) == (  # type: ignore[attr-defined]
        "safe_openai",
        "x",
        "m",
        "hi",
    )


def test_a_raising_handler_or_processor_never_breaks_a_call(
    fake: FakeOpenAI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_log, "_failed_once", False)

    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("broken filter")

    logger = logging.getLogger("safe_openai")
    broken = Broken()
    logger.setLevel(logging.DEBUG)
    logger.addFilter(broken)
    try:
        with make_client(fake) as client:
            acme = client.for_customer("acme")
            acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
            )
            with pytest.raises(ModerationBlocked):
                acme.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "kill"}]
                )

            def explode(logger: object, method: str, event: object) -> object:
                raise RuntimeError("broken processor")

            structlog.configure(processors=[explode])
            client.suspend("globex", reason="testing")
            with pytest.raises(CustomerSuspended):
                client.for_customer("globex").chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
                )
            assert len(client.store.usage_records(customer_id="acme")) == 2
    finally:
        logger.removeFilter(broken)
        logger.setLevel(logging.NOTSET)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("safe_openai: a log handler or processor raised RuntimeError; ignored") == 1


def test_render_quotes_what_would_not_read_back() -> None:
    assert render("safe_openai.x", {"a": "b", "n": 2, "s": "two words", "l": ["v"]}) == (
        "safe_openai.x a=b n=2 s='two words' l=['v']"
    )
    forged = "acme\nsafe_openai.customer_unsuspended customer_id=globex"
    line = render("safe_openai.request_blocked", {"customer_id": forged, "e": "", "q": "a=b"})
    assert "\n" not in line
    assert line == (
        "safe_openai.request_blocked customer_id='acme\\nsafe_openai.customer_unsuspended "
        "customer_id=globex' e='' q='a=b'"
    )
