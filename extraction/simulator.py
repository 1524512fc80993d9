"""An OpenAI-compatible chat-completions simulator served over HTTP on loopback.

Tests, the dev server and benchmarks reach it through the real ``openai`` SDK, so it
speaks just enough HTTP/1.1 for httpx and answers like a property-extraction model
would: a few plausible properties quoted from the transcript it was sent. Faults come
from rates (``SimulatorOptions``) or from markers in the user content such as
``[[sim:500x2]]``, and every chat request is logged with wall-clock times so that
tests in another process can prove when calls started and stopped.

Standard library only: it must start fast and never be a benchmark's bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import random
import re
import resource
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4.1", "gpt-4o", "sim-model")
# "localhost" maps to one address: with --port 0 two sockets would get two ports.
LOOPBACK_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
LOG_LIMIT = 200_000  # a long benchmark must not grow the log without bound
SCAN_LIMIT = 30_000
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
READ_CHUNK = 256 * 1024


class OptionError(ValueError):
    """A bad simulator option: the message names it."""


@dataclass
class SimulatorOptions:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_bad_json: float = 0.0
    rate_truncated: float = 0.0
    rate_refusal: float = 0.0
    # Bad JSON for the first answer to a request only (by its user message):
    # the same request asked again is answered as usual.
    rate_bad_json_first: float = 0.0
    retry_after: int = 1
    seed: int = 0
    api_key: str | None = None
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    # False plays an endpoint without structured outputs: a request with
    # response_format gets a 400, as such endpoints answer.
    structured_output: bool = True
    # While true, answers wait (a request still arrives, is logged, and is
    # aborted if its client leaves): lets a test hold a job open.
    paused: bool = False

    def __post_init__(self):
        for name in ("latency_ms", "jitter_ms"):
            _check_number(name, getattr(self, name), maximum=math.inf)
        for name in (
            "rate_429",
            "rate_500",
            "rate_bad_json",
            "rate_truncated",
            "rate_refusal",
            "rate_bad_json_first",
        ):
            _check_number(name, getattr(self, name), maximum=1.0)
        for name in ("retry_after", "seed"):
            if type(getattr(self, name)) is not int:
                raise OptionError(f"{name} must be an integer")
        if self.retry_after < 0:
            raise OptionError("retry_after must be >= 0")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise OptionError("api_key must be a string or null")
        if not isinstance(self.models, list) or not all(isinstance(m, str) for m in self.models):
            raise OptionError("models must be a list of strings")
        for name in ("structured_output", "paused"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be true or false")

    def updated(self, changes: dict) -> SimulatorOptions:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_number(name, value, maximum):
    # bool is an int subclass; "rate_500": true is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= maximum:
        bound = "a number >= 0" if maximum == math.inf else f"a number between 0 and {maximum}"
        raise OptionError(f"{name} must be {bound}")


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

    def _open_record(self, request: dict | None) -> dict:
        request = request or {}
        user = _user_content(request.get("messages"))
        record = {
            "id": self._next_id,
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
        self._next_id += 1
        self._log.append(record)
        self._open.add(record["id"])
        self._max_in_flight = max(self._max_in_flight, len(self._open))
        return record

    def _reply(self, request, problem, authorization, record) -> Reply:
        if not self.authorized(authorization):
            return error_reply(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
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
        user = _user_content(request["messages"])
        # Draw from the RNG for every valid request, so a marker does not shift later draws.
        roll = self._rng.random()
        jitter = self._rng.uniform(-1.0, 1.0) * self.options.jitter_ms
        kind, latency_ms = self._fault(user, record["user_sha256"], roll)
        if kind == "ok" and self._bad_first_call(record["user_sha256"]):
            kind = "bad_json"
        if kind == "400_echo_auth":
            # A careless proxy quoting the credentials back in its error.
            return error_reply(400, f"Bad request for credentials {authorization}", "invalid_request_error")
        delay = max(0.0, (self.options.latency_ms if latency_ms is None else latency_ms) + jitter) / 1000
        reply = self._fault_reply(kind) or self._answer_reply(request, user, kind, record["id"])
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

    def _bad_first_call(self, user_sha256: str) -> bool:
        """Whether this first answer to a request is bad JSON (rate_bad_json_first)."""
        if not self.options.rate_bad_json_first or user_sha256 in self._asked:
            return False
        self._asked.add(user_sha256)
        # A draw of its own, and only with the option on, so the other faults' draws are as before.
        return self._rng.random() < self.options.rate_bad_json_first

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

    def _answer_reply(self, request: dict, user: str, kind: str, record_id: int) -> Reply:
        object_form = _response_format_type(request) in ("json_schema", "json_object")
        content, finish_reason = compose_answer(user, self.options.seed, kind, object_form)
        refusal = REFUSAL_TEXT if kind == "refusal" else None
        limit = request.get("max_tokens") or request.get("max_completion_tokens")
        if isinstance(limit, int) and len(content) > limit * 4:
            content, finish_reason = content[: limit * 4], "length"
        outcome = "truncated" if finish_reason == "length" else _ANSWER_OUTCOMES.get(kind, "ok")
        prompt_chars = sum(len(_text(m.get("content"))) for m in request["messages"])
        payload = {
            "id": f"chatcmpl-sim{record_id}",
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
        404: "not_found",
        429: "rate_limited",
        500: "server_error",
    }.get(status, "bad_request")
    payload = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return Reply(status, payload, outcome)


def _usage(prompt_chars: int, completion_chars: int) -> dict:
    prompt, completion = math.ceil(prompt_chars / 4), math.ceil(completion_chars / 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _parse_chat_body(body: bytes) -> tuple[dict | None, str | None]:
    """The request as a dict (None if not JSON) and what is wrong with it, if anything."""
    try:
        request = json.loads(body)
    except ValueError:
        return None, "We could not parse the JSON body of your request."
    if not isinstance(request, dict):
        return None, "The request body must be a JSON object."
    messages = request.get("messages")
    if not isinstance(request.get("model"), str):
        return request, "you must provide a model parameter"
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return request, "'messages' must be a non-empty array of message objects."
    if request.get("stream"):
        return request, "stream=true is not supported by the simulator."
    return request, None


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


def compose_answer(content: str, seed: int, kind: str, object_form: bool) -> tuple[str, str]:
    """The assistant message for `content` and its finish_reason; same input, same answer."""
    if kind == "refusal":
        return REFUSAL_TEXT, "stop"
    rng = random.Random(f"{hashlib.sha256(content.encode()).hexdigest()}:{seed}")
    if kind == "bad_json":
        return rng.choice(_PROSE_ANSWERS), "stop"
    if kind == "empty":
        properties = []
    elif kind == "invalid_items":
        properties = _invalid_items(content, rng)
    else:
        properties = describe_transcript(content, rng)
    items = [json.dumps(p) for p in properties]
    array = "[" + ", ".join(items) + "]"
    prefix = '{"properties": ' if object_form else _preamble(content, rng) + "\n\n```json\n"
    suffix = "}" if object_form else "\n```"
    if kind == "truncated":
        # Cut inside the second object, as a model running out of tokens would.
        cut = 1 + len(items[0]) + 2 + len(items[1]) // 2
        return prefix + array[:cut], "length"
    return prefix + array + suffix, "stop"


_PROSE_ANSWERS = (
    "The assistant handled the conversation reasonably well and stayed polite throughout. "
    "I do not see anything else worth reporting about its behaviour here.",
    "Overall this looks like a fairly standard exchange. The agent answered the questions it "
    "was asked and the user seemed satisfied with the outcome.",
)


def _preamble(content: str, rng: random.Random) -> str:
    if _is_side_by_side(content):
        return rng.choice(
            (
                "I compared how Model A and Model B handled the same conversation.",
                "Both responses address the same task; below are the behaviours that set them apart.",
            )
        )
    return rng.choice(
        (
            "I read the whole conversation and noted the behaviours that stand out.",
            "Looking at the transcript, a few behaviours of the assistant are worth recording. "
            "Here they are as JSON.",
        )
    )


def _is_side_by_side(content: str) -> bool:
    return "Model A" in content and "Model B" in content


def describe_transcript(content: str, rng: random.Random) -> list[dict]:
    """3 to 6 properties quoting the transcript; for side-by-side both models appear."""
    text = content[:SCAN_LIMIT]
    count = rng.randint(3, 6)
    if not _is_side_by_side(content):
        return _pick(_Scan(text).candidates(rng), count, rng)
    (a_start, a_end), (b_start, b_end) = _model_ranges(text)
    a_count = rng.choice((count // 2, count - count // 2))
    properties = [
        {**prop, "model": model}
        for model, segment, wanted in (
            ("Model A", text[a_start:a_end], max(1, a_count)),
            ("Model B", text[b_start:b_end], max(1, count - a_count)),
        )
        for prop in _pick(_Scan(segment).candidates(rng), wanted, rng)
    ]
    rng.shuffle(properties)
    return properties


def _pick(candidates: tuple[list[dict], list[dict]], count: int, rng: random.Random) -> list[dict]:
    specific, generic = candidates
    rng.shuffle(specific)
    return (specific + generic)[:count]


def _invalid_items(content: str, rng: random.Random) -> list[dict]:
    valid = describe_transcript(content, rng)[:2]
    empty = {**valid[0], "property_description": ""}
    weird = {**valid[1], "behavior_type": "Weird"}
    return [valid[0], empty, valid[1], weird]


# Patterns that must hold at a line start begin with "\n": a literal first character
# lets the regex engine skip ahead fast, and passages start with "\n".
_ROLE_LABEL = re.compile(
    r"\n[ \t>*#\[]*(user|assistant|system|tool|human|ai|agent|customer)\b", re.IGNORECASE
)
_ASSISTANT_ROLES = {"assistant", "ai", "agent"}
_MODEL_HEADING = re.compile(r"\n[^\w\n]*Model ([AB])\b")
_LIST_ITEM = re.compile(r"\n[ \t]*(?:[-*•]|\d{1,2}[.)])[ \t]+\S")
_LINE_START = re.compile(r"\n(?=[^\n]*\S)")
# Each pattern matches where its keyword is found (the percentage: just before it).
_TOOL_CALL = re.compile(r"\bcall(?:s|ed|ing)?\s+`?([A-Za-z_][\w.]*)`?\s+with\b")
_QUESTION = re.compile(r"\?")
_APOLOGY = re.compile(r"\b(?:sorry|apologi[sz]e|apologies)\b", re.IGNORECASE)
_REFUSAL = re.compile(
    r"\b(?:can(?:no|'|\u2019)t|unable to|won(?:'|\u2019)t|not able to)\s+"
    r"(?:help|assist|do|provide|process|share|book|cancel|modify|change|offer)\b",
    re.IGNORECASE,
)
_REFUSAL_KEYWORDS = ("can't", "cannot", "can\u2019t", "unable", "won't", "won\u2019t", "not able")
_MONEY = re.compile(r"[$€£]\s?\d[\d,]*(?:\.\d+)?")
_PERCENT = re.compile(r"\b\d+(?:\.\d+)?\s?%")
_THANKS = re.compile(r"\b(?:thank you|thanks)\b", re.IGNORECASE)


def _model_ranges(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where Model A's and Model B's parts are: from their heading to the other's or the end."""
    starts = {}
    for match in _MODEL_HEADING.finditer("\n" + text):
        starts.setdefault(match.group(1), match.start())
    a = starts.get("A", max(text.find("Model A"), 0))
    b = starts.get("B", max(text.find("Model B"), 0))
    if a < b:
        return (a, b), (b, len(text))
    return (a, len(text)), (b, a)


class _Passage:
    """A text that starts with a newline; its excerpts are verbatim parts of one line."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def lowered(self) -> str:
        return _lower_keeping_offsets(self.text)

    def matches(self, keywords, pattern, *, limit=3, lookbehind=0) -> list[re.Match]:
        """Up to `limit` matches of `pattern` where one of `keywords` is (or `lookbehind` before).

        str.find locates the (lowercase) keywords fast; a regex without a literal prefix,
        run over 30 KB for every simulated request, would cost a hundred times more.
        """
        found = {}
        haystack = self.lowered if pattern.flags & re.IGNORECASE else self.text
        for keyword in keywords:
            position = haystack.find(keyword)
            while position >= 0 and len(found) < limit:
                if lookbehind:
                    match = pattern.search(self.text, max(0, position - lookbehind), position + 1)
                else:
                    match = pattern.match(self.text, position)
                if match:
                    found.setdefault(match.start(), match)
                position = haystack.find(keyword, position + len(keyword))
        return [found[start] for start in sorted(found)][:limit]

    def line_end(self, position: int) -> int:
        end = self.text.find("\n", position)
        return len(self.text) if end < 0 else end

    def quote(self, start: int, end: int, width: int = 120) -> str:
        """A short excerpt around text[start:end], within its line."""
        text = self.text
        line_start = text.rfind("\n", 0, start) + 1
        line_end = self.line_end(end)
        left = max(line_start, start - width // 3)
        right = min(line_end, left + width)
        # Trim to whole words where the excerpt cuts a line short.
        if left > line_start and (space := text.find(" ", left, start)) >= 0:
            left = space + 1
        if right < line_end and (space := text.rfind(" ", end, right)) >= 0:
            right = space
        return text[left:right].strip() or text[start:end].strip()

    def quote_line(self, start: int) -> str:
        return self.quote(start, self.line_end(start))

    def sentence(self, position: int) -> str:
        """The sentence (or line) that ends at `position`."""
        floor = max(0, position - 160)
        begin = max(floor, *(self.text.rfind(mark, floor, position) + 1 for mark in ".!?\n"))
        return self.text[begin : position + 1].strip()


class _Scan:
    """What a transcript (or one model's part of it) shows, as candidate properties.

    The assistant's turns are found from role labels at line starts ("assistant:",
    "**User**", ...) and joined into one passage of whole lines, so that quotes from it
    are still verbatim. Without any label, every line may be the assistant's.
    """

    def __init__(self, text: str):
        self.whole = _Passage("\n" + text)
        turns, labelled = self._assistant_turns()
        if turns:
            self.said = _Passage(
                "\n" + "".join(turn if turn.endswith("\n") else turn + "\n" for turn in turns)
            )
            self.turn_starts = [m.start() + 1 for m in _ROLE_LABEL.finditer(self.said.text)]
        else:
            self.said = _Passage("\n") if labelled else self.whole
            self.turn_starts = [m.start() + 1 for m in _LINE_START.finditer(self.whole.text)]

    def _assistant_turns(self) -> tuple[list[str], bool]:
        """The assistant's turns, each from its label to the next label, and whether any label exists."""
        text = self.whole.text
        labels = list(_ROLE_LABEL.finditer(text))
        turns = [
            text[label.start() + 1 : following.start() + 1 if following else len(text)]
            for label, following in itertools.pairwise([*labels, None])
            if label.group(1).lower() in _ASSISTANT_ROLES
        ]
        return turns, bool(labels)

    def candidates(self, rng: random.Random) -> tuple[list[dict], list[dict]]:
        """Properties backed by a finding, then always-true fallbacks."""
        finders = (
            self._tool_use,
            self._questions,
            self._apology,
            self._refusal,
            self._figures,
            self._thanks,
            self._lists,
        )
        specific = [prop for finder in finders if (prop := finder(rng))]
        return specific, self._generic(rng)

    def _tool_use(self, rng):
        firsts = {}
        for match in self.whole.matches(("call",), _TOOL_CALL, limit=20):
            firsts.setdefault(match.group(1), match)
        if not firsts:
            return None
        names = list(firsts)[:2]
        return _prop(
            f"The assistant calls {' and '.join(names)} to check facts before answering the user.",
            "Tool use",
            "Looking the data up keeps the reply consistent with the records instead of guessing.",
            [self.whole.quote(*firsts[name].span()) for name in names],
            "Positive",
        )

    def _questions(self, rng):
        if not (found := self.said.matches(("?",), _QUESTION)):
            return None
        return _prop(
            "The assistant asks the user for missing details before acting on the request.",
            "Clarification",
            "Asking first avoids acting on assumptions the user never confirmed.",
            [self.said.sentence(rng.choice(found).start())],
            "Positive",
        )

    def _apology(self, rng):
        if not (found := self.said.matches(("sorry", "apolog"), _APOLOGY)):
            return None
        return _prop(
            "The assistant apologises to the user when something cannot be done as hoped.",
            "Empathy",
            "An apology acknowledges the user's frustration without changing the outcome.",
            [self.said.quote(*rng.choice(found).span())],
            "Style",
        )

    def _refusal(self, rng):
        if not (found := self.said.matches(_REFUSAL_KEYWORDS, _REFUSAL)):
            return None
        return _prop(
            "The assistant declines part of the request and states the limitation plainly.",
            "Refusal",
            "It does not do what the user asked, although it explains why.",
            [self.said.quote(*rng.choice(found).span())],
            "Negative (non-critical)",
            unexpected_behavior=rng.random() < 0.3,
        )

    def _figures(self, rng):
        found = self.said.matches(("$", "€", "£"), _MONEY) + self.said.matches(
            ("%",), _PERCENT, lookbehind=16
        )
        if not found:
            return None
        match = rng.choice(found)
        wrong = rng.random() < 0.25
        return _prop(
            f"The assistant quotes concrete figures such as {match.group(0).strip()} in its reply.",
            "Specificity",
            "A quoted figure that disagrees with the tool output would mislead the user."
            if wrong
            else "Exact figures let the user decide without asking again.",
            [self.said.quote(*match.span())],
            "Negative (critical)" if wrong else "Positive",
            contains_errors=wrong,
        )

    def _thanks(self, rng):
        if not (found := self.said.matches(("thank",), _THANKS)):
            return None
        return _prop(
            "The assistant thanks the user and keeps a courteous tone.",
            "Tone",
            "Thanking the user is friendly but adds nothing to the task.",
            [self.said.quote(*rng.choice(found).span())],
            "Style",
        )

    def _lists(self, rng):
        items = [m.start() + 1 for m in _LIST_ITEM.finditer(self.said.text)]
        if len(items) < 2:
            return None
        return _prop(
            "The assistant formats options as a numbered or bulleted list.",
            "Formatting",
            "A list makes several options easy to compare at a glance.",
            [self.said.quote_line(items[0])],
            "Style",
        )

    def _generic(self, rng):
        passage = self.said if len(self.said.text) > 1 else self.whole
        starts = self.turn_starts or [0]
        other = rng.choice(starts)
        length = _prop(
            "The assistant gives long, detailed replies that cover every option."
            if len(passage.text) > 2000
            else "The assistant keeps its replies short and to the point.",
            "Verbosity",
            "Reply length changes how quickly the user gets the answer they need.",
            [passage.quote_line(starts[0])],
            "Style",
        )
        focus = _prop(
            "The assistant stays on the user's task throughout the conversation.",
            "Task focus",
            "Every turn moves the user's request forward rather than drifting off topic.",
            [passage.quote_line(other)],
            "Positive",
        )
        tone = _prop(
            "The assistant keeps a calm, professional tone with the user.",
            "Professionalism",
            "A neutral tone suits a customer-facing conversation.",
            [passage.quote_line(other)],
            "Style",
        )
        return [length, focus, tone]


def _lower_keeping_offsets(text: str) -> str:
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    # A few characters lower to two (e.g. "İ"); keep those as they are so offsets still match.
    return "".join(char if len(char.lower()) != 1 else char.lower() for char in text)


def _prop(
    description, category, reason, evidence, behavior_type, contains_errors=False, unexpected_behavior=False
):
    return {
        "property_description": " ".join(description.split()[:20]),
        "category": category,
        "reason": reason,
        "evidence": list(dict.fromkeys(evidence)),
        "behavior_type": behavior_type,
        "contains_errors": contains_errors,
        "unexpected_behavior": unexpected_behavior,
    }


class _Malformed(Exception):
    """The client sent something that is not HTTP/1.1 we can answer; reply and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Connection:
    """One client connection with its own read buffer.

    Owning the buffer lets us watch for the client going away during a reply's latency
    (by reading) without losing the bytes of a request it may have pipelined meanwhile.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.closed = False

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(READ_CHUNK)
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    async def read_until(self, separator: bytes, limit: int) -> bytes | None:
        """Bytes up to `separator` (consumed), or None if the client closed first."""
        searched = 0
        while (index := self.buffer.find(separator, searched)) < 0:
            if len(self.buffer) > limit:
                raise _Malformed(431, "request header fields too large")
            searched = max(0, len(self.buffer) - len(separator) + 1)
            if not await self._fill():
                return None
        data = bytes(self.buffer[:index])
        del self.buffer[: index + len(separator)]
        return data

    async def read_exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not await self._fill():
                return None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def closed_within(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: until the client leaves); True if the client left meanwhile."""
        if self.closed or self.writer.transport.is_closing():
            return True
        try:
            async with asyncio.timeout(seconds):
                while await self._fill():
                    pass
        except TimeoutError:
            return False
        return True

    def send(self, status: int, payload: dict, headers: dict, keep_alive: bool) -> bool:
        """Write a JSON response; False (nothing written) if the client is already gone."""
        if self.closed or self.writer.transport.is_closing():
            return False
        body = json.dumps(payload).encode()
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
            "Connection: keep-alive" if keep_alive else "Connection: close",
        ]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return True


async def _read_request(conn: _Connection) -> _Request | None:
    head = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
    if head is None:
        return None
    request_line, *header_lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
    try:
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _Malformed(400, "malformed request line") from None
    headers = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise _Malformed(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(conn, headers)
    if body is None:
        return None
    path, _, query = target.partition("?")
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
    return _Request(method, path, query, headers, body, keep_alive)


async def _read_body(conn: _Connection, headers: dict) -> bytes | None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(conn)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _Malformed(400, "invalid Content-Length") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise _Malformed(413, f"body larger than {MAX_BODY_BYTES} bytes")
    return await conn.read_exactly(length)


async def _read_chunked(conn: _Connection) -> bytes | None:
    chunks, total = [], 0
    while True:
        size_line = await conn.read_until(b"\r\n", 1024)
        if size_line is None:
            return None
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise _Malformed(400, "invalid chunk size") from None
        total += size
        if total > MAX_BODY_BYTES:
            raise _Malformed(413, f"body larger than {MAX_BODY_BYTES} bytes")
        if size == 0:
            break
        chunk = await conn.read_exactly(size + 2)  # the chunk and its CRLF
        if chunk is None:
            return None
        chunks.append(chunk[:-2])
    while trailer := await conn.read_until(b"\r\n", MAX_HEAD_BYTES):
        pass  # trailers carry nothing we use
    return b"".join(chunks) if trailer is not None else None


class _Server:
    """HTTP/1.1 front of a Simulator: routing, latency and disconnect detection."""

    def __init__(self, simulator: Simulator):
        self.simulator = simulator
        self.connections: set[asyncio.Task] = set()
        self.routes = {
            ("GET", "/v1/models"): self._models,
            ("GET", "/_sim/stats"): lambda request: (200, simulator.stats()),
            ("GET", "/_sim/requests"): self._requests,
            ("POST", "/_sim/reset"): self._reset,
            ("GET", "/_sim/config"): lambda request: (200, simulator.options.as_dict()),
            ("POST", "/_sim/config"): self._configure,
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self.connections.add(task)
        conn = _Connection(reader, writer)
        try:
            while (request := await _read_request(conn)) and await self._respond(conn, request):
                await writer.drain()
        except _Malformed as exc:
            conn.send(exc.status, _error_body(str(exc), "invalid_request_error"), {}, keep_alive=False)
        except ConnectionError:
            pass  # the client went away between requests: nothing to answer
        except asyncio.CancelledError:
            # Only close_connections() cancels us. Python 3.11's start_server logs a handler
            # task that ends cancelled as an error, so end normally.
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    async def close_connections(self):
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _respond(self, conn: _Connection, request: _Request) -> bool:
        """Answer one request; True if the connection stays open for another."""
        if (request.method, request.path) == ("POST", "/v1/chat/completions"):
            return await self._chat(conn, request)
        handler = self.routes.get((request.method, request.path))
        if handler:
            status, payload = handler(request)
        elif any(path == request.path for _, path in self.routes):
            status, payload = 405, _error_body(f"{request.method} not allowed here", "invalid_request_error")
        else:
            status, payload = 404, _error_body(f"Unknown path {request.path}", "invalid_request_error")
        return conn.send(status, payload, {}, request.keep_alive) and request.keep_alive

    async def _chat(self, conn: _Connection, request: _Request) -> bool:
        simulator = self.simulator
        call = simulator.start_call(request.body, request.headers.get("authorization"))
        headers = {"x-request-id": f"req_sim{call.record['id']}", **call.reply.headers}
        try:
            if await self._held_while_paused(conn):
                simulator.end_call(call, aborted=True)
                return False
            delay = call.reply.delay
            if (delay is None or delay > 0) and await conn.closed_within(delay):
                simulator.end_call(call, aborted=True)
                return False
            if not conn.send(call.reply.status, call.reply.payload, headers, request.keep_alive):
                simulator.end_call(call, aborted=True)
                return False
            simulator.end_call(call)
        finally:
            # Server shutdown or an unexpected error: the record must still end.
            simulator.end_call(call, aborted=True)
        return request.keep_alive

    async def _held_while_paused(self, conn: _Connection) -> bool:
        """Wait while the simulator is paused; True if the client left meanwhile."""
        while self.simulator.options.paused:
            if await conn.closed_within(0.02):
                return True
        return False

    def _models(self, request: _Request) -> tuple[int, dict]:
        if not self.simulator.authorized(request.headers.get("authorization")):
            return 401, _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        models = [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "llm-simulator"}
            for name in self.simulator.options.models
        ]
        return 200, {"object": "list", "data": models}

    def _requests(self, request: _Request) -> tuple[int, dict]:
        since = re.search(r"(?:^|&)since=(\d+)", request.query)
        return 200, {"requests": self.simulator.requests(int(since.group(1)) if since else 0)}

    def _reset(self, request: _Request) -> tuple[int, dict]:
        self.simulator.reset()
        return 200, {"reset": True}

    def _configure(self, request: _Request) -> tuple[int, dict]:
        try:
            changes = json.loads(request.body or b"{}")
            if not isinstance(changes, dict):
                raise OptionError("the body must be a JSON object of options")
            options = self.simulator.configure(changes)
        except (ValueError, TypeError) as exc:  # OptionError and bad JSON are ValueErrors
            return 400, _error_body(str(exc), "invalid_request_error", "invalid_option")
        return 200, options.as_dict()


def _error_body(message: str, error_type: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def loopback_host(host: str) -> str:
    """The address to bind for `host`; anything but loopback is refused."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the simulator binds to loopback only (127.0.0.1, ::1, localhost), not {host!r}")
    return LOOPBACK_HOSTS[host]


async def serve(
    host: str,
    port: int,
    options: SimulatorOptions | None = None,
    ready_callback: Callable[[str, int], None] | None = None,
):
    """Serve until cancelled; `ready_callback(host, port)` gets the bound port once listening."""
    server = _Server(Simulator(options))
    listener = await asyncio.start_server(server.handle, loopback_host(host), port, backlog=4096)
    bound_host, bound_port = listener.sockets[0].getsockname()[:2]
    if ready_callback:
        ready_callback(bound_host, bound_port)
    try:
        await asyncio.Future()
    finally:
        listener.close()
        await server.close_connections()
        await listener.wait_closed()


def run(
    host: str,
    port: int,
    options: SimulatorOptions | None = None,
    ready_callback: Callable[[str, int], None] | None = None,
):
    """Serve until SIGINT or SIGTERM, then return normally."""
    _raise_open_files_limit()
    asyncio.run(_serve_until_signalled(host, port, options, ready_callback))


async def _serve_until_signalled(host, port, options, ready_callback):
    task = asyncio.ensure_future(serve(host, port, options, ready_callback))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _raise_open_files_limit():
    # Thousands of idle keep-alive connections at high latency need more than the usual 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
