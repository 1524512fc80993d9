"""The provider's Batch API through the official SDK: upload an input file,
create, retrieve, cancel and find batches, read a result file line by line.

The SDK's own retries stay on for everything but creating a batch: a
create retried after its answer was lost would start a second batch,
where the recovery (poll.recover_uploaded) finds the first by its metadata."""

import contextlib
import os
from collections.abc import Iterator
from typing import IO

import openai
from django.conf import settings
from openai.types import Batch

from extraction.llm import redact

# The metadata key naming our ProviderBatch on the provider's batch.
METADATA_KEY = "stringsight_batch"
# An input file may take much longer to upload than a chat call to answer.
UPLOAD_TIMEOUT_FACTOR = 5
# A batch created by a killed worker is among the provider's newest: the
# search by metadata stops at batches this much older than our record.
FIND_WINDOW_SECONDS = 3600

TERMINAL_STATUSES = frozenset({"completed", "expired", "cancelled", "failed"})


class NoBatchApi(Exception):
    """The provider answered 404 for /v1/files or /v1/batches: it has no Batch API."""


class BatchProvider:
    def __init__(self, *, api_key: str | None, base_url: str | None, timeout: float):
        self.api_key = api_key
        self.base_url = (base_url or "https://api.openai.com/v1").rstrip("/")
        self.timeout = timeout
        self.client = openai.OpenAI(api_key=api_key or "missing", base_url=self.base_url, timeout=timeout)

    @classmethod
    def from_django(cls) -> "BatchProvider":
        # The workers' endpoint and key (jobs.worker.engine.WorkerSettings).
        return cls(
            api_key=os.environ.get("OPENAI_API_KEY"),
            base_url=os.environ.get("OPENAI_BASE_URL") or None,
            timeout=settings.STRINGSIGHT_LLM_TIMEOUT,
        )

    def close(self) -> None:
        self.client.close()

    def upload(self, name: str, content: IO[bytes]) -> str:
        with self._no_batch_api("/v1/files"):
            uploaded = self.client.files.create(
                file=(name, content, "application/jsonl"),
                purpose="batch",
                timeout=self.timeout * UPLOAD_TIMEOUT_FACTOR,
            )
        return uploaded.id

    def create(self, *, input_file_id: str, record_id: str) -> Batch:
        with self._no_batch_api("/v1/batches"):
            return self.client.with_options(max_retries=0).batches.create(
                input_file_id=input_file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={METADATA_KEY: record_id},
            )

    def retrieve(self, batch_id: str) -> Batch:
        return self.client.batches.retrieve(batch_id)

    def cancel(self, batch_id: str) -> Batch:
        return self.client.batches.cancel(batch_id)

    def find(self, *, record_id: str, created_after: float) -> Batch | None:
        """The provider's batch whose metadata names our record, looking
        from the newest back to `created_after` (epoch seconds)."""
        with self._no_batch_api("/v1/batches"):
            for batch in self.client.batches.list(limit=100):
                if (batch.metadata or {}).get(METADATA_KEY) == record_id:
                    return batch
                if batch.created_at < created_after - FIND_WINDOW_SECONDS:
                    return None
        return None

    def lines(self, file_id: str) -> Iterator[bytes]:
        """A result file's lines, streamed: an output file may be larger
        than a worker's memory should hold."""
        with self.client.files.with_streaming_response.content(
            file_id, timeout=self.timeout * UPLOAD_TIMEOUT_FACTOR
        ) as response:
            for line in response.iter_lines():
                if line.strip():
                    yield line.encode() if isinstance(line, str) else line

    def no_batch_api_message(self, exc: openai.APIError) -> str:
        said = redact(str(getattr(exc, "message", "") or exc), self.api_key)[:300]
        return f"the LLM provider has no Batch API at {self.base_url}: {said}"

    @contextlib.contextmanager
    def _no_batch_api(self, path: str):
        """A 404 from the Batch API's own paths means the provider has none."""
        try:
            yield
        except openai.NotFoundError as exc:
            raise NoBatchApi(f"{self.no_batch_api_message(exc)} ({path} answered 404)") from None
