"""The pytest plugin: the ``fake_openai`` fixture.

Registered with ``pytest_plugins = ["safe_openai.testing"]`` in an application's root
``conftest.py``; :mod:`safe_openai.testing` only imports this module when pytest is importable.
"""

from __future__ import annotations

import pytest

from ._fake import FakeOpenAI


@pytest.fixture
def fake_openai() -> FakeOpenAI:
    """A fresh :class:`~safe_openai.testing.FakeOpenAI` for one test.

    Register it with ``pytest_plugins = ["safe_openai.testing"]`` in the root
    ``conftest.py``, then build clients from ``fake_openai.openai_kwargs()``.
    """
    return FakeOpenAI()
