"""The conformance runner's own logic: its list of expected differences and its report reader.
(The SDK's tests themselves run in CI through ``tests/sdk_conformance/run.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

from tests.sdk_conformance import run

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.test_client.TestOpenAI" name="test_copy_signature">
<failure message="x"/></testcase>
<testcase classname="tests.lib.chat.test_stream_moderation" name="test_stream_moderation[a-sync]">
<error message="x"/></testcase>
<testcase classname="tests.test_client.TestOpenAI" name="test_ok"/>
</testsuite></testsuites>
"""


def test_every_expected_difference_has_a_reason_and_is_a_test_of_the_subset() -> None:
    expected = json.loads((Path(run.__file__).parent / "expected.json").read_text())
    for test, reason in expected["differences"].items():
        assert "::" in test and test.startswith("tests/")
        assert run._ran(test, run.SUBSET), test
        assert len(reason) > 40, test


def test_the_report_reader_names_failures_as_pytest_does(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    report.write_text(REPORT)
    failed, ran = run._read(report)
    assert ran == 3
    assert failed == {
        "tests/test_client.py::TestOpenAI::test_copy_signature",
        "tests/lib/chat/test_stream_moderation.py::test_stream_moderation[a-sync]",
    }
