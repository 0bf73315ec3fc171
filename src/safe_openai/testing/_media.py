"""``POST /embeddings``, ``POST /images/generations``, ``POST /audio/speech`` and the model list."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import zlib
from collections.abc import Mapping

from ._base import (
    _CREATED,
    _STATIC_HEADERS,
    JSON,
    _ApiError,
    _dumps,
    _FakeBase,
    _json_reply,
    _Reply,
    _tokens,
)


def _png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    pixels = zlib.compress(b"\x00\x00\x00\x00\x00")  # filter byte + one transparent pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG_BYTES = _png_1x1()
"""The image every generation returns: a valid 1x1 transparent PNG."""
_PNG_B64 = base64.b64encode(PNG_BYTES).decode("ascii")


def _wav_silence(samples: int = 16) -> bytes:
    data = b"\x00\x00" * samples
    fmt = struct.pack("<HHIIHH", 1, 1, 24_000, 48_000, 2, 16)  # PCM mono 24 kHz 16-bit
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


_SPEECH: Mapping[str, tuple[str, bytes]] = {
    "mp3": ("audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xf3\x14\xc4" + bytes(16)),
    "opus": ("audio/ogg", b"OggS\x00\x02" + bytes(20)),
    "aac": ("audio/aac", b"\xff\xf1\x50\x80" + bytes(16)),
    "flac": ("audio/flac", b"fLaC" + bytes(20)),
    "wav": ("audio/wav", _wav_silence()),
    "pcm": ("audio/pcm", bytes(32)),
}

_MODELS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "system"),
    ("gpt-4o-mini", "system"),
    ("gpt-4.1", "system"),
    ("gpt-4.1-mini", "system"),
    ("o4-mini", "system"),
    ("gpt-3.5-turbo-instruct", "system"),
    ("text-embedding-3-small", "system"),
    ("text-embedding-3-large", "system"),
    ("omni-moderation-latest", "system"),
    ("gpt-image-1", "system"),
    ("dall-e-3", "system"),
    ("tts-1", "system"),
    ("gpt-4o-mini-tts", "system"),
)
_MODEL_OBJECTS: Mapping[str, JSON] = {
    model_id: {"id": model_id, "object": "model", "created": _CREATED, "owned_by": owner}
    for model_id, owner in _MODELS
}
_MODEL_LIST_BODY = _dumps({"object": "list", "data": list(_MODEL_OBJECTS.values())}).encode()


def _embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``, exact in float32 (so base64 round-trips)."""
    digest = b""
    counter = 0
    while len(digest) < dims:
        digest += hashlib.blake2b(f"{counter}:{text}".encode(), digest_size=64).digest()
        counter += 1
    raw = [(b - 127.5) / 127.5 for b in digest[:dims]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    packed = struct.pack(f"<{dims}f", *(x / norm for x in raw))
    return list(struct.unpack(f"<{dims}f", packed))


class _MediaAPI(_FakeBase):
    """Embeddings, images, speech and models of :class:`~safe_openai.testing.FakeOpenAI`."""

    def _embeddings(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "input")
        value = body["input"]
        texts: list[str]
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            texts = list(value)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            texts = [_dumps(value)]
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            texts = [_dumps(v) for v in value]
        else:
            raise _ApiError(400, "Invalid value for 'input'.", param="input")
        dims = body.get("dimensions") or 8
        if not isinstance(dims, int) or dims < 1:
            raise _ApiError(400, "Invalid value for 'dimensions'.", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        data: list[JSON] = []
        for index, text in enumerate(texts):
            vector = _embedding(text, dims)
            encoded: object = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode("ascii")
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(_tokens(len(t)) for t in texts)
        return _json_reply(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _images(self, body: JSON, number: int) -> _Reply:
        self._require(body, "prompt")
        count = body.get("n") or 1
        as_url = body.get("response_format") == "url"
        image: JSON = (
            {"url": f"https://fake.openai.test/images/img_fake{number:04d}.png"}
            if as_url
            else {"b64_json": _PNG_B64}
        )
        prompt_tokens = _tokens(len(str(body["prompt"])))
        return _json_reply(
            {
                "created": _CREATED,
                "data": [dict(image) for _ in range(count)],
                "background": "opaque",
                "output_format": "png",
                "quality": "low",
                "size": body.get("size") or "1024x1024",
                "usage": {
                    "input_tokens": prompt_tokens,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
                    "output_tokens": 272 * count,
                    "output_tokens_details": {"image_tokens": 272 * count, "text_tokens": 0},
                    "total_tokens": prompt_tokens + 272 * count,
                },
            }
        )

    def _speech(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "input", "voice")
        fmt = body.get("response_format") or "mp3"
        if fmt not in _SPEECH:
            raise _ApiError(
                400, f"Invalid value for 'response_format': {fmt!r}.", param="response_format"
            )
        content_type, audio = _SPEECH[fmt]
        return _Reply(body=audio, headers=(*_STATIC_HEADERS, ("content-type", content_type)))

    @staticmethod
    def _model(model_id: str) -> _Reply:
        model = _MODEL_OBJECTS.get(model_id)
        if model is None:
            raise _ApiError(
                404,
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param=None,
                code="model_not_found",
            )
        return _json_reply(model)
