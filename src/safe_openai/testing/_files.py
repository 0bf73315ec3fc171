"""``POST /files``, ``GET /files/{id}/content``, ``POST /batches``, ``GET /batches/{id}`` and
running a batch on demand (:meth:`~safe_openai.testing.FakeOpenAI.run_batch`)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ._base import (
    _CREATED,
    _STATIC_HEADERS,
    JSON,
    _ApiError,
    _dumps,
    _FakeBase,
    _json_reply,
    _Reply,
)

_BINARY_HEADERS = (*_STATIC_HEADERS, ("content-type", "application/octet-stream"))


def _form_fields(content: bytes, content_type: str) -> JSON:
    """The fields of a ``multipart/form-data`` body; a file field becomes
    ``{"filename": ..., "content": bytes}``."""
    boundary = content_type.partition("boundary=")[2].strip('"').encode()
    fields: JSON = {}
    for part in content.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part[2:].partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        disposition = next(
            (
                line
                for line in head.decode().split("\r\n")
                if line.lower().startswith("content-disposition")
            ),
            "",
        )
        params = dict(
            item.strip().split("=", 1) for item in disposition.split(";")[1:] if "=" in item
        )
        name = params.get("name", "").strip('"')
        if "filename" in params:
            fields[name] = {"filename": params["filename"].strip('"'), "content": data}
        else:
            fields[name] = data.decode()
    return fields


class _FilesAPI(_FakeBase):
    """Files and batches of :class:`~safe_openai.testing.FakeOpenAI`."""

    def run_batch(self, batch_id: str) -> JSON:
        """Run a batch now: answer each request of its input file as the endpoint would, write
        the output file (and an error file for requests that failed) and mark it completed.

        Returns:
            The batch, as ``batches.retrieve`` will now return it.

        Raises:
            KeyError: No such batch.
        """
        with self._lock:
            batch = self.batches[batch_id]
            content: bytes = self.files[batch["input_file_id"]]["content"]
        output: list[bytes] = []
        errors: list[bytes] = []
        for raw in content.splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            with self._lock:
                self._counter += 1
                number = self._counter
            reply = self._route("POST", self._relative(line["url"]), line["body"], number)
            answer = {
                "id": f"batch_req_fake{number:04d}",
                "custom_id": line.get("custom_id"),
                "response": {
                    "status_code": reply.status,
                    "request_id": f"req_{number:04d}",
                    "body": json.loads(reply.body),
                },
                "error": None,
            }
            (output if reply.status == 200 else errors).append(_dumps(answer).encode() + b"\n")
        with self._lock:
            batch["output_file_id"] = self._store_file("batch_output.jsonl", output)
            batch["error_file_id"] = (
                self._store_file("batch_errors.jsonl", errors) if errors else None
            )
            batch["status"] = "completed"
            batch["completed_at"] = _CREATED + 3600
            batch["request_counts"] = {
                "total": len(output) + len(errors),
                "completed": len(output),
                "failed": len(errors),
            }
            return dict(batch)

    def _store_file(
        self, filename: str, lines: Sequence[bytes], purpose: str = "batch_output"
    ) -> str:
        file_id = f"file-fake{len(self.files) + 1:04d}"
        self.files[file_id] = {"filename": filename, "purpose": purpose, "content": b"".join(lines)}
        return file_id

    @staticmethod
    def _file_object(file_id: str, entry: JSON) -> JSON:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(entry["content"]),
            "created_at": _CREATED,
            "filename": entry["filename"],
            "purpose": entry["purpose"],
            "status": "processed",
        }

    def _upload_file(self, body: JSON, number: int) -> _Reply:
        upload = body.get("file")
        if not isinstance(upload, dict) or not isinstance(body.get("purpose"), str):
            raise _ApiError(400, "A file and a purpose are required.", param="file")
        with self._lock:
            file_id = self._store_file(upload["filename"], [upload["content"]], body["purpose"])
            return _json_reply(self._file_object(file_id, self.files[file_id]))

    def _file_content(self, file_id: str) -> _Reply:
        with self._lock:
            entry = self.files.get(file_id)
        if entry is None:
            raise _ApiError(404, f"No such File object: {file_id}")
        return _Reply(body=entry["content"], headers=_BINARY_HEADERS)

    def _create_batch(self, body: JSON, number: int) -> _Reply:
        self._require(body, "input_file_id", "endpoint", "completion_window")
        with self._lock:
            if body["input_file_id"] not in self.files:
                raise _ApiError(404, f"No such File object: {body['input_file_id']}")
            batch_id = f"batch_fake{number:04d}"
            self.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": "in_progress",
                "created_at": _CREATED,
                "output_file_id": None,
                "error_file_id": None,
                "metadata": body.get("metadata"),
            }
            return _json_reply(self.batches[batch_id])

    def _batch(self, batch_id: str) -> _Reply:
        with self._lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            raise _ApiError(404, f"No such Batch object: {batch_id}")
        return _json_reply(batch)
