"""The simulated provider's state: which fault a chat request meets (from the rates in
``SimulatorOptions`` or from markers such as ``[[sim:500x2]]`` in its user content), the
request log with wall-clock times, and the counters behind ``/_sim/stats``.

Tests in another process read the log to prove when calls started and stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from llm_simulator.answers import REFUSAL_TEXT, compose_answer
from llm_simulator.limits import ProviderLimits
from llm_simulator.options import SimulatorOptions

LOG_LIMIT = 200_000  # a long benchmark must not grow the log without bound


@dataclass
class Reply:
    """What to send for one chat request, and after how long (None: never, a hang)."""

    status: int
    payload: dict
    outcome: str
    delay: float | None = 0.0
    headers: dict = field(default_factory=dict)


@dataclass
class Call:
    record: dict
    reply: Reply
    epoch: int


class Simulator:
    """State of the simulated LLM: options, the fault RNG, counters and the request log."""

    def __init__(self, options: SimulatorOptions | None = None):
        self.options = options or SimulatorOptions()
        self._epoch = 0
        self.reset()

    def reset(self):
        # Calls still open from before a reset end in the old epoch and are not counted.
        self._epoch += 1
        self._rng = random.Random(self.options.seed)
        self._log = deque(maxlen=LOG_LIMIT)
        self._open = set()
        self._next_id = 1
        self._max_in_flight = 0
        self._outcomes = Counter()
        self._failures_left = {}
        self._asked = set()  # user messages seen, for rate_bad_json_first
        self._limits = ProviderLimits()
        self._batch_log = deque(maxlen=LOG_LIMIT)
        self._next_batch_line_id = 1
        self._batch_outcomes = Counter()

    def configure(self, changes: dict) -> SimulatorOptions:
        options = self.options.updated(changes)
        if options.seed != self.options.seed:
            self._rng = random.Random(options.seed)
        self.options = options
        return options

    def stats(self) -> dict:
        return {
            "requests_total": self._next_id - 1,
            "in_flight": len(self._open),
            "max_in_flight": self._max_in_flight,
            "by_outcome": dict(self._outcomes),
        }

    def requests(self, since: int = 0) -> list[dict]:
        return [record for record in self._log if record["id"] > since]

    def batch_stats(self) -> dict:
        return {"lines_total": self._next_batch_line_id - 1, "by_outcome": dict(self._batch_outcomes)}

    def batch_lines(self, since: int = 0) -> list[dict]:
        return [record for record in self._batch_log if record["id"] > since]

    def authorized(self, authorization: str | None) -> bool:
        return self.options.api_key is None or authorization == f"Bearer {self.options.api_key}"

    def start_call(self, body: bytes, authorization: str | None) -> Call:
        request, problem = _parse_chat_body(body)
        record = self._open_record(request)
        reply = self._reply(request, problem, authorization, record)
        return Call(record, reply, self._epoch)

    def end_call(self, call: Call, aborted: bool = False):
        """Close the call's record (once): as planned, or as aborted with no status sent."""
        record = call.record
        if record["ended_at"] is not None:
            return
        record["ended_at"] = time.time()
        record["outcome"] = "aborted" if aborted else call.reply.outcome
        record["status"] = None if aborted else call.reply.status
        if call.epoch == self._epoch:
            self._open.discard(record["id"])
            self._outcomes[record["outcome"]] += 1

    def answer_batch_line(self, request: dict, batch_id: str, custom_id: str) -> tuple[dict, Reply]:
        """Answer a batch's request line as a live call with its body would be answered,
        and log it apart from the live calls (``batch_lines``); a reply whose delay is
        None (a hang) is never answered and its record stays open.

        The line's draws come from an RNG of its own, seeded by the seed and the
        custom_id: its fate depends neither on the order the lines are answered in nor
        on the live calls meanwhile, and it does not shift the live calls' draws.
        """
        rng = random.Random(f"{self.options.seed}:{custom_id}")
        failed = rng.random() < self.options.batch_rate_failed
        record = {
            **_new_record(self._next_batch_line_id, request),
            "batch_id": batch_id,
            "custom_id": custom_id,
        }
        self._next_batch_line_id += 1
        self._batch_log.append(record)
        reply = self._rejected(request, _chat_problem(request))
        if reply is None and failed:
            reply = error_reply(
                500, "The server had an error processing this batch line (simulated).", "server_error"
            )
        reply = reply or self._model_reply(request, record, rng, None, f"chatcmpl-simbatch{record['id']}")
        if reply.delay is not None:
            record["ended_at"] = time.time()
            record["outcome"], record["status"] = reply.outcome, reply.status
            self._batch_outcomes[reply.outcome] += 1
        return record, reply

    def _open_record(self, request: dict | None) -> dict:
        record = _new_record(self._next_id, request)
        self._next_id += 1
        self._log.append(record)
        self._open.add(record["id"])
        self._max_in_flight = max(self._max_in_flight, len(self._open))
        return record

    def _reply(self, request, problem, authorization, record) -> Reply:
        if not self.authorized(authorization):
            return error_reply(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if refused := self._limits.refused_before_the_model(self.options):
            reply = error_reply(*refused)
            reply.outcome = "quota_spent" if refused[0] == 429 else reply.outcome
            return reply
        if rejected := self._rejected(request, problem):
            return rejected
        if over := self._limits.take(self.options, request, in_flight=len(self._open)):
            message, headers = over
            reply = error_reply(429, message, "requests", "rate_limit_exceeded")
            reply.headers.update(headers)
            return reply
        reply = self._model_reply(request, record, self._rng, authorization, f"chatcmpl-sim{record['id']}")
        reply.headers.update(self._limits.headers(self.options))
        return reply

    def _rejected(self, request, problem) -> Reply | None:
        """The 400 or 404 for a request the model cannot take, if it cannot."""
        if problem:
            return error_reply(400, problem, "invalid_request_error", None)
        if request["model"] not in self.options.models:
            message = f"The model `{request['model']}` does not exist or you do not have access to it."
            return error_reply(404, message, "invalid_request_error", "model_not_found")
        if not self.options.structured_output and request.get("response_format") is not None:
            message = (
                "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
            )
            return error_reply(400, message, "invalid_request_error", None)
        return None

    def _model_reply(self, request, record, rng, authorization, completion_id) -> Reply:
        """The model's answer or the fault the request meets, drawn from `rng`."""
        user = _user_content(request["messages"])
        # Draw from the RNG for every valid request, so a marker does not shift later draws.
        roll = rng.random()
        jitter = rng.uniform(-1.0, 1.0) * self.options.jitter_ms
        kind, latency_ms = self._fault(user, record["user_sha256"], roll)
        if kind == "ok" and self._bad_first_call(record["user_sha256"], rng):
            kind = "bad_json"
        if kind == "400_echo_auth":
            # A careless proxy quoting the credentials back in its error.
            return error_reply(400, f"Bad request for credentials {authorization}", "invalid_request_error")
        delay = max(0.0, (self.options.latency_ms if latency_ms is None else latency_ms) + jitter) / 1000
        reply = self._fault_reply(kind) or self._answer_reply(request, user, kind, completion_id)
        reply.delay = None if kind == "hang" else delay
        return reply

    def _fault(self, user: str, user_sha256: str, roll: float) -> tuple[str, float | None]:
        """The request's fate: a marker's kind first, else one drawn from the rates."""
        kind, latency_ms = None, None
        for match in _MARKER.finditer(user):
            name, times, value = match.groups()
            if name == "latency" and value is not None:
                latency_ms = float(value)
            elif kind is None and name in _MARKER_KINDS and value is None:
                kind = self._fail_first(user_sha256, name, int(times)) if times else name
        return kind or self._drawn_fault(roll), latency_ms

    def _bad_first_call(self, user_sha256: str, rng: random.Random) -> bool:
        """Whether this first answer to a request is bad JSON (rate_bad_json_first)."""
        if not self.options.rate_bad_json_first or user_sha256 in self._asked:
            return False
        self._asked.add(user_sha256)
        # A draw of its own, and only with the option on, so the other faults' draws are as before.
        return rng.random() < self.options.rate_bad_json_first

    def _fail_first(self, user_sha256: str, name: str, times: int) -> str:
        left = self._failures_left.setdefault(user_sha256, times)
        if left <= 0:
            return "ok"
        self._failures_left[user_sha256] = left - 1
        return name

    def _drawn_fault(self, roll: float) -> str:
        options = self.options
        for kind, rate in (
            ("429", options.rate_429),
            ("500", options.rate_500),
            ("bad_json", options.rate_bad_json),
            ("truncated", options.rate_truncated),
            ("refusal", options.rate_refusal),
        ):
            if roll < rate:
                return kind
            roll -= rate
        return "ok"

    def _fault_reply(self, kind: str) -> Reply | None:
        if kind == "429":
            reply = error_reply(
                429, "Rate limit reached for requests (simulated).", "requests", "rate_limit_exceeded"
            )
            reply.headers["Retry-After"] = str(self.options.retry_after)
            return reply
        if kind == "500":
            return error_reply(
                500, "The server had an error processing your request (simulated).", "server_error"
            )
        if kind == "400":
            return error_reply(400, "Invalid request (simulated).", "invalid_request_error")
        return None

    def _answer_reply(self, request: dict, user: str, kind: str, completion_id: str) -> Reply:
        object_form = _response_format_type(request) in ("json_schema", "json_object")
        content, finish_reason = compose_answer(user, self.options.seed, kind, object_form)
        refusal = REFUSAL_TEXT if kind == "refusal" else None
        limit = request.get("max_tokens") or request.get("max_completion_tokens")
        if isinstance(limit, int) and len(content) > limit * 4:
            content, finish_reason = content[: limit * 4], "length"
        outcome = "truncated" if finish_reason == "length" else _ANSWER_OUTCOMES.get(kind, "ok")
        prompt_chars = sum(len(_text(m.get("content"))) for m in request["messages"])
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage(prompt_chars, len(content)),
        }
        return Reply(200, payload, outcome)


_MARKER = re.compile(r"\[\[sim:(\w+?)(?:x(\d+)|=(\d+(?:\.\d+)?))?\]\]")
_MARKER_KINDS = {
    "429",
    "500",
    "400",
    "400_echo_auth",
    "bad_json",
    "refusal",
    "truncated",
    "hang",
    "empty",
    "invalid_items",
}
_ANSWER_OUTCOMES = {"bad_json": "bad_json", "refusal": "refusal", "truncated": "truncated"}


def error_reply(status: int, message: str, error_type: str, code: str | None = None) -> Reply:
    outcome = {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        429: "rate_limited",
        500: "server_error",
    }.get(status, "bad_request")
    payload = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return Reply(status, payload, outcome)


def _usage(prompt_chars: int, completion_chars: int) -> dict:
    prompt, completion = math.ceil(prompt_chars / 4), math.ceil(completion_chars / 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _new_record(record_id: int, request: dict | None) -> dict:
    request = request or {}
    user = _user_content(request.get("messages"))
    return {
        "id": record_id,
        "model": request.get("model"),
        "started_at": time.time(),
        "ended_at": None,
        "outcome": None,
        "status": None,
        "user_sha256": hashlib.sha256(user.encode()).hexdigest() if request else None,
        "user_preview": user[:200],
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "max_tokens": request.get("max_tokens"),
        "max_completion_tokens": request.get("max_completion_tokens"),
        "response_format_type": _response_format_type(request),
    }


def _parse_chat_body(body: bytes) -> tuple[dict | None, str | None]:
    """The request as a dict (None if not JSON) and what is wrong with it, if anything."""
    try:
        request = json.loads(body)
    except ValueError:
        return None, "We could not parse the JSON body of your request."
    if not isinstance(request, dict):
        return None, "The request body must be a JSON object."
    return request, _chat_problem(request)


def _chat_problem(request: dict) -> str | None:
    """What is wrong with a chat request's body, if anything."""
    messages = request.get("messages")
    if not isinstance(request.get("model"), str):
        return "you must provide a model parameter"
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "'messages' must be a non-empty array of message objects."
    if request.get("stream"):
        return "stream=true is not supported by the simulator."
    return None


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _user_content(messages) -> str:
    if not isinstance(messages, list):
        return ""
    return "".join(
        _text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"
    )


def _response_format_type(request: dict) -> str | None:
    response_format = request.get("response_format")
    return response_format.get("type") if isinstance(response_format, dict) else None
