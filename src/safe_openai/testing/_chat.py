"""``POST /chat/completions`` (plain, streamed, structured output, tool calls) and the legacy
``POST /completions``."""

from __future__ import annotations

from ._base import (
    _CREATED,
    _SSE_DONE,
    _SSE_HEADERS,
    JSON,
    _ApiError,
    _content_text,
    _dumps,
    _FakeBase,
    _json_reply,
    _Reply,
    _split_deltas,
    _sse_data,
    _tokens,
)


class _ChatAPI(_FakeBase):
    """Chat completions and legacy completions of :class:`~safe_openai.testing.FakeOpenAI`."""

    def _chat_completions(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "messages")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "Invalid value for 'messages'.", param="messages")
        prompt_chars = 0
        user_text = ""
        for message in messages:
            if not isinstance(message, dict):
                raise _ApiError(400, "Invalid value for 'messages'.", param="messages")
            text = _content_text(message.get("content"))
            prompt_chars += len(text)
            if message.get("role") == "user":
                user_text = text
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        json_object = isinstance(fmt, dict) and fmt.get("type") == "json_object"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        text, output_tokens, cut = self._limit(
            self._reply_text(user_text, schema, json_object), limit
        )
        finish = "length" if cut else "stop"
        n = body.get("n") or 1
        model = body["model"]
        completion_id = f"chatcmpl-fake{number:04d}"
        tool = self._tool_to_call(body, messages, "chat")
        if tool is not None:
            arguments = _dumps(self.tool_arguments)
            usage = self._chat_usage(prompt_chars, _tokens(len(arguments)))
            return self._chat_tool_call(body, completion_id, tool, arguments, usage, number)
        usage = self._chat_usage(prompt_chars, output_tokens * n)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise _ApiError(400, "Invalid type for 'stream_options'.", param="stream_options")
            return self._chat_stream(
                completion_id, model, text, finish, n, usage, bool(options.get("include_usage"))
            )
        return _json_reply(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": _CREATED,
                "model": model,
                "choices": [
                    {
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for index in range(n)
                ],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    def _chat_stream(
        self,
        completion_id: str,
        model: str,
        text: str,
        finish: str,
        n: int,
        usage: JSON,
        include_usage: bool,
    ) -> _Reply:
        def chunk(choices: list[JSON]) -> bytes:
            value: JSON = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                value["usage"] = None
            return _sse_data(value)

        def choice(index: int, delta: JSON, finish_reason: str | None = None) -> JSON:
            return {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }

        chunks: list[bytes] = []
        for index in range(n):
            first = {"role": "assistant", "content": "", "refusal": None}
            chunks.append(chunk([choice(index, first)]))
            chunks.extend(
                chunk([choice(index, {"content": piece})])
                for piece in _split_deltas(text, size=self.delta_chars)
            )
            chunks.append(chunk([choice(index, {}, finish)]))
        if include_usage:
            final: JSON = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            }
            chunks.append(_sse_data(final))
        chunks.append(_SSE_DONE)
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)

    @staticmethod
    def _chat_tool_call(
        body: JSON, completion_id: str, name: str, arguments: str, usage: JSON, number: int
    ) -> _Reply:
        call = {
            "id": f"call_fake{number:04d}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        head: JSON = {
            "id": completion_id,
            "created": _CREATED,
            "model": body["model"],
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
            return _json_reply(
                {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            )

        def chunk(delta: JSON, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse_data({**head, "object": "chat.completion.chunk", "choices": [choice]})

        opening = {**call, "index": 0, "function": {"name": name, "arguments": ""}}
        chunks = [
            chunk({"role": "assistant", "content": None, "tool_calls": [opening]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
            chunk({}, "tool_calls"),
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(
                _sse_data(
                    {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                )
            )
        return _Reply(chunks=[*chunks, _SSE_DONE], headers=_SSE_HEADERS)

    def _completions(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model", "prompt")
        prompt = body["prompt"]
        prompts: list[str]
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:  # token ids: one prompt, counted as tokens
            prompts = [" " * (4 * len(prompt) if isinstance(prompt, list) else 0)]
        completion_id = f"cmpl-fake{number:04d}"
        model = body["model"]
        choices: list[JSON] = []
        output_tokens = 0
        for index, text in enumerate(prompts):
            reply, tokens, cut = self._limit(
                self._reply_text(text.strip(), None), body.get("max_tokens")
            )
            output_tokens += tokens
            choices.append(
                {
                    "index": index,
                    "text": reply,
                    "logprobs": None,
                    "finish_reason": "length" if cut else "stop",
                }
            )
        usage = self._chat_usage(sum(len(p) for p in prompts), output_tokens)
        envelope: JSON = {
            "id": completion_id,
            "object": "text_completion",
            "created": _CREATED,
            "model": model,
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            return _json_reply({**envelope, "choices": choices, "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra: JSON = {"usage": None} if include_usage else {}
        chunks: list[bytes] = []
        for choice in choices:
            for piece in _split_deltas(choice["text"], size=self.delta_chars):
                delta = {"index": choice["index"], "text": piece, "logprobs": None}
                chunks.append(
                    _sse_data({**envelope, **extra, "choices": [{**delta, "finish_reason": None}]})
                )
            end = {"index": choice["index"], "text": "", "logprobs": None}
            chunks.append(
                _sse_data(
                    {
                        **envelope,
                        **extra,
                        "choices": [{**end, "finish_reason": choice["finish_reason"]}],
                    }
                )
            )
        if include_usage:
            chunks.append(_sse_data({**envelope, "choices": [], "usage": usage}))
        chunks.append(_SSE_DONE)
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)
