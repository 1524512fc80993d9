"""The answer composer: what a property-extraction model would say about a transcript.

A few plausible properties quoted verbatim from the transcript, as a JSON object (with
structured outputs) or as a fenced array after a sentence of prose; the same content and
seed always give the same answer.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re

REFUSAL_TEXT = "I'm sorry, but I can't help with that."
SCAN_LIMIT = 30_000


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
