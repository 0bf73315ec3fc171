"""``POST /moderations``: scores from flag words and pinned scores, one combined result per
multi-modal input, at most one image per request."""

from __future__ import annotations

from collections.abc import Mapping

from safe_openai.policy import MODERATION_CATEGORIES

from ._base import JSON, _ApiError, _dumps, _FakeBase, _Reply

# The omni model scores images in these categories only; the others apply to text alone.
_IMAGE_CATEGORIES = frozenset(
    {
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "violence",
        "violence/graphic",
    }
)

DEFAULT_FLAG_WORDS: Mapping[str, str] = {
    "kill": "violence",
    "bomb": "illicit/violent",
    "hate you": "harassment",
}
"""Words the fake flags when no ``flag_words`` are given (case-insensitive substrings)."""

FLAGGED_SCORE = 0.97
"""The score a ``flag_words`` match gives its category."""
LOW_SCORE = 0.001
"""The score of every category nothing matched."""
FLAG_THRESHOLD = 0.5
"""A category counts as flagged when its score is at least this."""

_MODERATION_MODEL = "omni-moderation-latest"

_CLEAN_SCORES: Mapping[str, float] = dict.fromkeys(MODERATION_CATEGORIES, LOW_SCORE)
_TEXT_TYPES: Mapping[str, list[str]] = {c: ["text"] for c in MODERATION_CATEGORIES}
_IMAGE_TYPES: Mapping[str, list[str]] = {
    c: (["image"] if c in _IMAGE_CATEGORIES else []) for c in MODERATION_CATEGORIES
}
_MIXED_TYPES: Mapping[str, list[str]] = {
    c: (["text", "image"] if c in _IMAGE_CATEGORIES else ["text"]) for c in MODERATION_CATEGORIES
}


def _moderation_result(scores: Mapping[str, float], applied: Mapping[str, list[str]]) -> str:
    categories = {c: scores[c] >= FLAG_THRESHOLD for c in scores}
    return _dumps(
        {
            "flagged": any(categories.values()),
            "categories": categories,
            "category_scores": dict(scores),
            "category_applied_input_types": dict(applied),
        }
    )


# Most moderated text is clean: serialise that result once.
_CLEAN_TEXT_RESULT = _moderation_result(_CLEAN_SCORES, _TEXT_TYPES)


class _ModerationAPI(_FakeBase):
    """The moderation endpoint of :class:`~safe_openai.testing.FakeOpenAI`."""

    def _score(self, key: str, text: str | None) -> dict[str, float] | None:
        """Scores for one text or image URL, or ``None`` when it is entirely clean."""
        scores: dict[str, float] | None = None
        if text:
            lowered = text.lower()
            for word, category in self.flag_words.items():
                if word.lower() in lowered:
                    scores = scores or dict(_CLEAN_SCORES)
                    scores[category] = FLAGGED_SCORE
        pinned = self.scores.get(key)
        if pinned:
            scores = scores or dict(_CLEAN_SCORES)
            scores.update(pinned)
        return scores

    def _moderations(self, body: JSON, number: int) -> _Reply:
        self._require(body, "input")
        value = body["input"]
        model = body.get("model") or _MODERATION_MODEL
        results: list[str]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise _ApiError(400, "Invalid value for 'input'.", param="input")
        if all(isinstance(item, str) for item in value):
            results = []
            for text in value:
                scores = self._score(text, text)
                results.append(
                    _CLEAN_TEXT_RESULT
                    if scores is None
                    else _moderation_result(scores, _TEXT_TYPES)
                )
        elif all(isinstance(item, dict) for item in value):
            results = [self._multimodal_result(value)]
        else:
            raise _ApiError(400, "Invalid value for 'input'.", param="input")
        text = (
            f'{{"id":"modr-fake{number:04d}","model":{_dumps(model)},'
            f'"results":[{",".join(results)}]}}'
        )
        return _Reply(body=text.encode())

    def _multimodal_result(self, items: list[JSON]) -> str:
        images = [item for item in items if item.get("type") == "image_url"]
        if len(images) > 1:
            raise _ApiError(
                400,
                f"Number of images ({len(images)}) exceeds maximum of 1",
                param="input",
                code="too_many_images",
            )
        combined = dict(_CLEAN_SCORES)
        has_text = False
        for item in items:
            kind = item.get("type")
            if kind == "text" and isinstance(item.get("text"), str):
                has_text = True
                scores = self._score(item["text"], item["text"])
            elif kind == "image_url":
                url = (item.get("image_url") or {}).get("url")
                if not isinstance(url, str):
                    raise _ApiError(400, "Invalid value for 'image_url'.", param="input")
                scores = self._score(url, None)
            else:
                raise _ApiError(400, f"Invalid input type: {kind!r}.", param="input")
            for category, score in (scores or {}).items():
                combined[category] = max(combined.get(category, 0.0), score)
        if images and has_text:
            applied = _MIXED_TYPES
        elif images:
            applied = _IMAGE_TYPES
        else:
            applied = _TEXT_TYPES
        return _moderation_result(combined, applied)
