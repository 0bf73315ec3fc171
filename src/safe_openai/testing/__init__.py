"""An offline stand-in for the OpenAI API, and pytest fixtures built on it.

:class:`FakeOpenAI` is an ``httpx2`` transport (sync and async) that answers the endpoints a
guarded application uses with JSON the ``openai`` SDK parses into its own types: moderations,
chat completions (plain, streamed, structured output), responses (plain and streamed),
legacy completions, embeddings, image generation, speech and the model list. Everything is
deterministic, so tests can assert on ids, scores and token counts::

    from safe_openai.testing import FakeOpenAI

    fake = FakeOpenAI(flag_words={"kill": "violence"})
    client = openai.OpenAI(**fake.openai_kwargs())
    client.moderations.create(model="omni-moderation-latest", input="I will kill it")
    assert fake.moderation_inputs == ["I will kill it"]

Failures are injected per path (:meth:`FakeOpenAI.fail`) and every request is recorded
(:attr:`FakeOpenAI.requests`) without its ``authorization`` header.

Code that builds its own client (a documentation snippet, an agent framework) reaches the fake
over real HTTP on loopback through :meth:`FakeOpenAI.serve`::

    with FakeOpenAI().serve() as base_url:
        os.environ["OPENAI_BASE_URL"] = base_url
        ...

Applications get a fresh fake per test from the ``fake_openai`` fixture by adding
``pytest_plugins = ["safe_openai.testing"]`` to their root ``conftest.py``. Importing this
package does not need pytest; the fixture is only defined when pytest is importable.

:func:`signed_webhook` builds a safety webhook delivery signed as OpenAI signs it, to test a
webhook endpoint end to end through :class:`~safe_openai.webhooks.SafetyWebhookHandler`.

The package has one module per API family (``_moderation``, ``_chat``, ``_responses``,
``_files``, ``_media``, ``_websocket``), the loopback server (``_server``), the transport that
mixes them (``_fake``) and the pytest plugin (``_plugin``); the names below are its public face.
"""

from safe_openai.policy import MODERATION_CATEGORIES

from ._base import AsyncOpenAIKwargs, OpenAIKwargs, RecordedRequest
from ._fake import FakeOpenAI
from ._media import PNG_BYTES
from ._moderation import DEFAULT_FLAG_WORDS, FLAG_THRESHOLD, FLAGGED_SCORE, LOW_SCORE
from ._webhooks import SignedWebhook, signed_webhook

try:
    import pytest  # noqa: F401  (only to know whether the plugin can load)
except ImportError:  # pragma: no cover - pytest is optional for non-fixture use
    pass
else:
    from ._plugin import fake_openai  # noqa: F401  (pytest_plugins = ["safe_openai.testing"])

__all__ = [
    "DEFAULT_FLAG_WORDS",
    "FLAGGED_SCORE",
    "FLAG_THRESHOLD",
    "LOW_SCORE",
    "MODERATION_CATEGORIES",
    "PNG_BYTES",
    "AsyncOpenAIKwargs",
    "FakeOpenAI",
    "OpenAIKwargs",
    "RecordedRequest",
    "SignedWebhook",
    "signed_webhook",
]
