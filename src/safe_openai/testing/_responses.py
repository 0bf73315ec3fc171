"""``POST /responses``: plain, streamed (typed SSE events), structured output and tool calls."""

from __future__ import annotations

from ._base import (
    _CREATED,
    _SSE_HEADERS,
    JSON,
    _ApiError,
    _content_text,
    _dumps,
    _FakeBase,
    _json_reply,
    _Reply,
    _split_deltas,
    _sse_event,
    _tokens,
)


class _ResponsesAPI(_FakeBase):
    """The Responses endpoint of :class:`~safe_openai.testing.FakeOpenAI`."""

    def _responses(self, body: JSON, number: int) -> _Reply:
        self._require(body, "model")
        instructions = body.get("instructions")
        prompt_chars = len(instructions) if isinstance(instructions, str) else 0
        user_text = ""
        value = body.get("input")
        if isinstance(value, str):
            prompt_chars += len(value)
            user_text = value
        elif isinstance(value, list):
            for item in value:
                if not isinstance(item, dict):
                    raise _ApiError(400, "Invalid value for 'input'.", param="input")
                text = _content_text(item.get("content"))
                if isinstance(item.get("output"), str):
                    text = item["output"]
                prompt_chars += len(text)
                if item.get("role") == "user":
                    user_text = text
        fmt = (body.get("text") or {}).get("format") or {}
        schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
        text, output_tokens, cut = self._limit(
            self._reply_text(user_text, schema, fmt.get("type") == "json_object"),
            body.get("max_output_tokens"),
        )
        prompt, cached, output, reasoning = self._usage_numbers(prompt_chars, output_tokens)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output,
        }
        status = "incomplete" if cut else "completed"
        message_id = f"msg_fake{number:04d}"
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {
            "id": message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part],
        }
        response: JSON = {
            "id": f"resp_fake{number:04d}",
            "object": "response",
            "created_at": _CREATED,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": instructions,
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": body["model"],
            "output": [item],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": fmt or {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": usage,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }
        tool = self._tool_to_call(body, value, "responses")
        if tool is not None:
            arguments = _dumps(self.tool_arguments)
            call: JSON = {
                "id": f"fc_fake{number:04d}",
                "type": "function_call",
                "call_id": f"call_fake{number:04d}",
                "name": tool,
                "arguments": arguments,
                "status": "completed",
            }
            tokens = _tokens(len(arguments))
            usage["output_tokens"], usage["total_tokens"] = tokens, prompt + tokens
            response.update(status="completed", incomplete_details=None, output=[call])
            if not body.get("stream"):
                return _json_reply(response)
            return self._responses_tool_stream(response, call)
        if not body.get("stream"):
            return _json_reply(response)
        return self._responses_stream(response, item, part)

    @staticmethod
    def _responses_tool_stream(response: JSON, call: JSON) -> _Reply:
        pending = {**response, "status": "in_progress", "output": [], "usage": None}
        where: JSON = {"item_id": call["id"], "output_index": 0}
        events: list[JSON] = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**call, "arguments": "", "status": "in_progress"},
            },
            {"type": "response.function_call_arguments.delta", **where, "delta": call["arguments"]},
            {
                "type": "response.function_call_arguments.done",
                **where,
                "name": call["name"],
                "arguments": call["arguments"],
            },
            {"type": "response.output_item.done", "output_index": 0, "item": call},
            {"type": "response.completed", "response": response},
        ]
        chunks = [_sse_event({**event, "sequence_number": n}) for n, event in enumerate(events)]
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)

    def _responses_stream(self, response: JSON, item: JSON, part: JSON) -> _Reply:
        pending = {
            **response,
            "status": "in_progress",
            "output": [],
            "usage": None,
            "incomplete_details": None,
        }
        item_id = item["id"]
        where: JSON = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events: list[JSON] = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {
                "type": "response.content_part.added",
                **where,
                "part": {**part, "text": ""},
            },
        ]
        events.extend(
            {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
            for piece in _split_deltas(part["text"], size=self.delta_chars)
        )
        events += [
            {"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {
                "type": "response.incomplete"
                if response["status"] == "incomplete"
                else "response.completed",
                "response": response,
            },
        ]
        chunks = [
            _sse_event({**event, "sequence_number": sequence})
            for sequence, event in enumerate(events)
        ]
        return _Reply(chunks=chunks, headers=_SSE_HEADERS)
