"""The simulated provider's files (``/v1/files``): uploads as OpenAI takes them
(``multipart/form-data`` with ``file`` and ``purpose``), answered as OpenAI's File
object, and kept in memory, as a test double may.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

FILE_LIMIT_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


class ApiError(Exception):
    """A request the provider refuses: its status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def as_object(self) -> dict:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


class FileStore:
    def __init__(self):
        self._files: dict[str, StoredFile] = {}

    def add(self, content: bytes, filename: str, purpose: str) -> StoredFile:
        stored = StoredFile(f"file-{secrets.token_hex(12)}", filename, purpose, content, int(time.time()))
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile:
        if file_id not in self._files:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return self._files[file_id]

    def delete(self, file_id: str) -> dict:
        self.get(file_id)
        del self._files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    def upload(self, content_type: str, body: bytes) -> StoredFile:
        """Store the file of a multipart upload; ApiError (400) names what is missing or wrong."""
        fields = parse_multipart(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if "file" not in fields or fields["file"][0] is None:
            raise ApiError(400, "'file' is a required property", param="file")
        if purpose not in UPLOAD_PURPOSES:
            raise ApiError(
                400, f"'{purpose}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'", param="purpose"
            )
        filename, content = fields["file"]
        if len(content) > FILE_LIMIT_BYTES:
            raise ApiError(
                400, f"File is too large: {len(content)} bytes, {FILE_LIMIT_BYTES} at most", param="file"
            )
        return self.add(content, filename, purpose)

    def clear(self):
        self._files.clear()


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')
_NAME = re.compile(r';\s*name="([^"]*)"')
_FILENAME = re.compile(r';\s*filename="([^"]*)"')


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name → (filename or None, content).

    bytes.find over the body, not the email package: an upload may be 200 MB.
    """
    found = _BOUNDARY.search(content_type) if content_type.startswith("multipart/form-data") else None
    if not found:
        raise ApiError(400, "the body must be multipart/form-data with a boundary")
    delimiter = b"--" + found.group(1).encode("latin-1")
    position = body.find(delimiter)
    fields = {}
    while position >= 0 and body[position + len(delimiter) : position + len(delimiter) + 2] == b"\r\n":
        head_end = body.find(b"\r\n\r\n", position)
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            break
        head = body[position + len(delimiter) + 2 : head_end].decode("utf-8", "replace")
        if name := _NAME.search(head):
            filename = _FILENAME.search(head)
            fields[name.group(1)] = (filename.group(1) if filename else None, body[head_end + 4 : end])
        position = end + 2
    if position < 0 or body[position + len(delimiter) : position + len(delimiter) + 2] != b"--":
        raise ApiError(400, "malformed multipart/form-data body")
    return fields
