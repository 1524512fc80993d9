"""The simulated provider's Batch API (``/v1/batches``), as OpenAI plays it.

A batch answers the chat requests of an uploaded JSONL file in the background, on the
server's event loop (a task per batch), each line exactly as a live call with its body
would be answered (``Simulator.answer_batch_line``). The statuses are OpenAI's:
validating → in_progress → finalizing → completed; failed (a bad input file); expired
(the window passed: lines not answered go to the error file as ``batch_expired``);
cancelling → cancelled (lines answered before the cancel took effect are in the output
file, the others in no file).

Lines are answered at ``batch_lines_per_second`` of wall-clock time, from the end of
validation to the batch's deadline (its expiry, or its cancel taking effect): how many
lines a batch answers before it expires or is cancelled depends on the clock, not on
how busy the machine is.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
import traceback
from collections import deque
from dataclasses import dataclass

from llm_simulator.faults import Simulator
from llm_simulator.files import ApiError, FileStore, StoredFile
from llm_simulator.options import SimulatorOptions

CHAT_ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS = 50_000
MAX_LISTED = 100
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
TICK_SECONDS = 0.02
SLICE = 64  # lines answered between two turns of the event loop, so live calls wait little
REPORTED_ERRORS = 100  # a file of a million bad lines need not list them all
_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


@dataclass
class _Line:
    number: int  # in the input file, from 1
    custom_id: str
    body: dict


class Batch:
    """One batch: OpenAI's Batch object, its lines still to answer and the lines of its files."""

    def __init__(
        self, batch_id: str, input_file: StoredFile, metadata: dict | None, options: SimulatorOptions
    ):
        now, clock = time.time(), time.monotonic()
        self.id = batch_id
        self.input_file = input_file
        self.metadata = metadata
        self.status = "validating"
        self.times = dict.fromkeys(_TIMES)
        self.times["created_at"] = int(now)
        self.times["expires_at"] = math.ceil(now + options.batch_expiry_seconds)
        self.validated_clock = clock + options.batch_validating_seconds
        self.expires_clock = clock + options.batch_expiry_seconds
        self.cancel_clock = math.inf
        self.validated = False
        # Lines are due from the end of validation on; `allowance` is how many are due now.
        self.lines_clock = self.validated_clock
        self.allowance = 0.0
        self.pending: deque[_Line] = deque()
        self.held: list[_Line] = []  # lines that hang: never answered
        self.total = self.completed = self.failed = 0
        self.output_lines: list[str] = []
        self.error_lines: list[str] = []
        self.errors: list[dict] | None = None
        self.output_file_id: str | None = None
        self.error_file_id: str | None = None

    def mark(self, status: str, stamp: str):
        self.status = status
        self.times[stamp] = int(time.time())

    def deadline(self) -> float:
        return self.cancel_clock if self.status == "cancelling" else self.expires_clock

    def as_object(self) -> dict:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": CHAT_ENDPOINT,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file.id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            **self.times,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


class Batches:
    """The batches and files of one simulator."""

    def __init__(self, simulator: Simulator):
        self.simulator = simulator
        self.files = FileStore()
        self._batches: dict[str, Batch] = {}  # in the order they were created
        self._tasks: set[asyncio.Task] = set()

    def create(self, request: dict) -> Batch:
        """A new batch, validating; ApiError (400) names a bad parameter."""
        input_file = self._input_file(request.get("input_file_id"))
        if request.get("endpoint") != CHAT_ENDPOINT:
            raise ApiError(
                400,
                f"The simulator's Batch API serves {CHAT_ENDPOINT} only.",
                param="endpoint",
                code="invalid_value",
            )
        if request.get("completion_window") != "24h":
            raise ApiError(
                400, "completion_window must be '24h'.", param="completion_window", code="invalid_value"
            )
        metadata = request.get("metadata")
        _check_metadata(metadata)
        batch = Batch(f"batch_{secrets.token_hex(12)}", input_file, metadata, self.simulator.options)
        self._batches[batch.id] = batch
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(lambda task: self._task_done(batch, task))
        return batch

    def get(self, batch_id: str) -> Batch:
        if batch_id not in self._batches:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return self._batches[batch_id]

    def cancel(self, batch_id: str) -> Batch:
        batch = self.get(batch_id)
        if batch.status in ("validating", "in_progress"):
            batch.mark("cancelling", "cancelling_at")
            batch.cancel_clock = time.monotonic() + self.simulator.options.batch_cancel_seconds
        elif batch.status not in ("cancelling", "cancelled"):
            raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.")
        return batch

    def page(self, limit: int, after: str | None) -> dict:
        """A page of the list, newest first, after the batch `after` if given."""
        newest_first = list(reversed(self._batches))
        start = 0
        if after is not None:
            if after not in self._batches:
                raise ApiError(400, f"No batch found with id '{after}'.", param="after")
            start = newest_first.index(after) + 1
        ids = newest_first[start : start + limit]
        return {
            "object": "list",
            "data": [self._batches[batch_id].as_object() for batch_id in ids],
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
            "has_more": start + limit < len(newest_first),
        }

    def reset(self):
        for task in self._tasks:
            task.cancel()
        self._batches.clear()
        self.files.clear()

    def _input_file(self, file_id) -> StoredFile:
        if not isinstance(file_id, str):
            raise ApiError(
                400,
                "Missing required parameter: 'input_file_id'.",
                param="input_file_id",
                code="missing_required_parameter",
            )
        try:
            input_file = self.files.get(file_id)
        except ApiError:
            raise ApiError(
                400,
                f"Invalid 'input_file_id': no file {file_id!r}.",
                param="input_file_id",
                code="invalid_value",
            ) from None
        if input_file.purpose != "batch":
            raise ApiError(
                400,
                f"The input file's purpose must be 'batch', not {input_file.purpose!r}.",
                param="input_file_id",
            )
        return input_file

    def _task_done(self, batch: Batch, task: asyncio.Task):
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A bug of the simulator must show, and its batch must not stay in progress for ever.
        traceback.print_exception(task.exception())
        batch.errors = [
            {"code": "simulator_error", "message": repr(task.exception()), "param": None, "line": None}
        ]
        batch.mark("failed", "failed_at")

    async def _run(self, batch: Batch):
        while batch.status not in TERMINAL:
            now = time.monotonic()
            # A batch is validated before it can expire, so that its lines can expire.
            if batch.status == "validating" and now >= min(batch.validated_clock, batch.expires_clock):
                await self._validate(batch)
            if batch.validated:
                await self._answer_due_lines(batch, now)
            self._settle(batch, now)
            await asyncio.sleep(TICK_SECONDS)

    async def _validate(self, batch: Batch):
        # In a thread: a 200 MB file would hold the live calls for seconds.
        lines, errors = await asyncio.to_thread(parse_input, batch.input_file.content)
        if errors:
            batch.errors = errors
            batch.mark("failed", "failed_at")
            return
        batch.validated = True
        batch.pending.extend(lines)
        batch.total = len(lines)
        if batch.status == "validating":  # not cancelled meanwhile
            batch.mark("in_progress", "in_progress_at")

    async def _answer_due_lines(self, batch: Batch, now: float):
        until = min(now, batch.deadline())
        options = self.simulator.options
        if not options.paused:  # a paused simulator holds batch lines as it holds live answers
            batch.allowance += max(0.0, until - batch.lines_clock) * options.batch_lines_per_second
        batch.lines_clock = max(batch.lines_clock, until)
        while batch.pending and batch.allowance >= 1:
            for _ in range(min(SLICE, int(batch.allowance), len(batch.pending))):
                self._answer(batch, batch.pending.popleft())
                batch.allowance -= 1
            await asyncio.sleep(0)
        if not batch.pending:
            batch.allowance = 0.0

    def _answer(self, batch: Batch, line: _Line):
        record, reply = self.simulator.answer_batch_line(line.body, batch.id, line.custom_id)
        if reply.delay is None:  # a hang: the line waits for its batch to expire or be cancelled
            batch.held.append(line)
            return
        response = {
            "status_code": reply.status,
            "request_id": f"req_simbatch{record['id']}",
            "body": reply.payload,
        }
        if reply.status == 200:
            batch.output_lines.append(_result_line(line.custom_id, response, None))
            batch.completed += 1
            return
        error = reply.payload["error"]
        # OpenAI leaves `error` null for a line its endpoint refused; the design has both
        # say what went wrong, so a reader may look at either.
        summary = {"code": error["code"] or error["type"], "message": error["message"]}
        batch.error_lines.append(_result_line(line.custom_id, response, summary))
        batch.failed += 1

    def _settle(self, batch: Batch, now: float):
        """End the batch when its cancel took effect, its window passed or its lines are done."""
        if batch.status == "cancelling" and now >= batch.cancel_clock:
            self._finish(batch, "cancelled", "cancelled_at")
        elif batch.status in ("validating", "in_progress") and now >= batch.expires_clock:
            unanswered = sorted([*batch.held, *batch.pending], key=lambda line: line.number)
            batch.error_lines += [_result_line(line.custom_id, None, _EXPIRED) for line in unanswered]
            batch.pending.clear()
            batch.held.clear()
            self._finish(batch, "expired", "expired_at")
        elif batch.status == "in_progress" and not batch.pending and not batch.held:
            batch.mark("finalizing", "finalizing_at")
            self._finish(batch, "completed", "completed_at")

    def _finish(self, batch: Batch, status: str, stamp: str):
        if batch.output_lines:
            batch.output_file_id = self._result_file(batch, "output", batch.output_lines)
        if batch.error_lines:
            batch.error_file_id = self._result_file(batch, "error", batch.error_lines)
        batch.output_lines, batch.error_lines = [], []
        batch.pending.clear()
        batch.mark(status, stamp)

    def _result_file(self, batch: Batch, kind: str, lines: list[str]) -> str:
        content = ("\n".join(lines) + "\n").encode()
        return self.files.add(content, f"{batch.id}_{kind}.jsonl", "batch_output").id


def _result_line(custom_id: str, response: dict | None, error: dict | None) -> str:
    return json.dumps(
        {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": custom_id,
            "response": response,
            "error": error,
        }
    )


def _check_metadata(metadata):
    valid = metadata is None or (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(key, str) and len(key) <= 64 and isinstance(value, str) and len(value) <= 512
            for key, value in metadata.items()
        )
    )
    if not valid:
        raise ApiError(
            400,
            "metadata must be at most 16 string keys (64 characters) with string values (512 characters).",
            param="metadata",
            code="invalid_value",
        )


def parse_input(content: bytes) -> tuple[list[_Line], list[dict]]:
    """The request lines of an input file, or the errors that fail its batch (OpenAI's shape)."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        line, problem = _request_line(number, raw)
        if line and line.custom_id in seen:
            problem = ("duplicate_custom_id", f"The custom_id {line.custom_id!r} is not unique.", "custom_id")
        if problem:
            code, message, param = problem
            errors.append({"code": code, "message": message, "param": param, "line": number})
            continue
        seen.add(line.custom_id)
        lines.append(line)
    if not lines and not errors:
        errors.append(
            {"code": "empty_file", "message": "The input file has no request.", "param": None, "line": None}
        )
    if len(lines) > MAX_REQUESTS:
        message = f"The input file has {len(lines)} requests; a batch takes {MAX_REQUESTS} at most."
        errors.append({"code": "too_many_requests", "message": message, "param": None, "line": None})
    return lines, errors[:REPORTED_ERRORS]


def _request_line(number: int, raw: bytes) -> tuple[_Line | None, tuple[str, str, str | None] | None]:
    try:
        item = json.loads(raw)
    except ValueError:
        return None, ("invalid_json_line", "This line is not parseable as valid JSON.", None)
    if not isinstance(item, dict):
        return None, ("invalid_json_line", "This line is not a JSON object.", None)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, ("missing_required_parameter", "The line has no 'custom_id' string.", "custom_id")
    if item.get("method") != "POST":
        return None, ("invalid_method", "The method must be 'POST'.", "method")
    if item.get("url") != CHAT_ENDPOINT:
        return None, ("invalid_url", f"The url must be the batch's endpoint, {CHAT_ENDPOINT}.", "url")
    if not isinstance(item.get("body"), dict):
        return None, ("missing_required_parameter", "The line has no 'body' object.", "body")
    return _Line(number, custom_id, item["body"]), None
