"""Parse the extraction LLM's answer into validated property dicts.

The answer is free text that should hold a JSON array of properties. LLMs wrap it in
prose and code fences, use smart quotes or Python literals, leave trailing commas,
and get cut off by the token limit. The scanner below finds the JSON, repairs those
slips, and decodes arrays item by item so that every complete property survives a
truncated or partly broken answer. One bad item is dropped on its own.
"""

import json
from dataclasses import dataclass, field

from .rows import json_type

BEHAVIOR_TYPES = ("Positive", "Negative (critical)", "Negative (non-critical)", "Style")

# behavior_type compared on its letters only: "negative(critical)", "Negative - critical"...
_BEHAVIOR_BY_LETTERS = {"".join(c for c in name.lower() if c.isalpha()): name for name in BEHAVIOR_TYPES}

_KEY_ALIASES = {"behaviour_type": "behavior_type", "unexpected_behaviour": "unexpected_behavior"}

_SIDE_FILLER_WORDS = frozenset(
    {"model", "response", "assistant", "answer", "output", "agent", "the", "of", "s"}
)

_DECODER = json.JSONDecoder(strict=False)  # strict=False lets raw newlines inside strings through

# Bounds the work on a hostile answer full of brackets; real answers need one or two tries.
_MAX_STARTS = 64
_MAX_RESUMES = 32
_MAX_UNCLOSED_REPAIRS = 4

_WHITESPACE = " \t\r\n"
_AFTER_STRING = ":,]}"
# Smart quotes, written as escapes so they are told apart from ASCII quotes at a glance.
_LEFT_DOUBLE, _RIGHT_DOUBLE, _LEFT_SINGLE, _RIGHT_SINGLE = "\u201c", "\u201d", "\u2018", "\u2019"
_STRING_CLOSERS = {
    '"': '"',
    _LEFT_DOUBLE: _RIGHT_DOUBLE + _LEFT_DOUBLE + '"',
    _RIGHT_DOUBLE: _RIGHT_DOUBLE + _LEFT_DOUBLE + '"',
    _LEFT_SINGLE: _RIGHT_SINGLE + _LEFT_SINGLE + "'",
    _RIGHT_SINGLE: _RIGHT_SINGLE + _LEFT_SINGLE + "'",
    "'": "'",
}
_JSON_ESCAPES = '"\\/bfnrtu'
_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}


@dataclass
class ParseResult:
    properties: list[dict]
    dropped: int
    problems: list[str]


@dataclass
class _Found:
    """Items decoded from one JSON value: (item, None) or (None, why it is unusable)."""

    slots: list[tuple[object, str | None]]
    clean: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def decoded(self) -> int:
        return sum(1 for _, broken in self.slots if broken is None)


def parse_properties(
    text: str, *, method: str, model_names: tuple[str, ...], question_id: str
) -> ParseResult:
    """Every valid property in the answer; invalid items are counted and explained, never raised."""
    if not isinstance(text, str) or not text.strip():
        return ParseResult(properties=[], dropped=0, problems=["empty answer"])
    found, saw_json = _find_items(text)
    if found is None:
        problem = "the JSON in the answer holds no properties" if saw_json else "no JSON found in the answer"
        return ParseResult(properties=[], dropped=0, problems=[problem])
    properties, problems = [], []
    for number, (item, broken) in enumerate(found.slots, start=1):
        if broken is None:
            prop, broken = _validate(item, method=method, model_names=model_names, question_id=question_id)
        if broken is None:
            properties.append(prop)
        else:
            problems.append(f"item {number}: {broken}")
    problems.extend(found.notes)
    return ParseResult(properties=properties, dropped=len(found.slots) - len(properties), problems=problems)


def _find_items(text: str) -> tuple[_Found | None, bool]:
    """The first clean set of items, fenced blocks first; failing that, the fullest partial one."""
    best, empty, saw_json = None, None, False
    for region in _regions(text):
        found, saw = _scan_region(region)
        saw_json = saw_json or saw
        if found is None:
            continue
        if not found.slots:
            empty = empty or found
        elif found.clean:
            return found, True
        elif best is None or found.decoded > best.decoded:
            best = found
    return best or empty, saw_json


def _regions(text: str) -> list[str]:
    """The contents of each ``` fenced block (an unclosed last one runs to the end), then the text."""
    regions = []
    fence = text.find("```")
    while fence != -1:
        start = fence + 3
        line_end = text.find("\n", start)
        if line_end != -1 and "[" not in text[start:line_end] and "{" not in text[start:line_end]:
            start = line_end + 1  # skip the language tag
        end = text.find("```", start)
        if end == -1:
            regions.append(text[start:])
            break
        regions.append(text[start:end])
        fence = text.find("```", end + 3)
    regions.append(text)
    return regions


def _scan_region(text: str) -> tuple[_Found | None, bool]:
    """Try each [ or { in turn until one starts a JSON value holding properties."""
    empty, saw_json, unclosed_repairs = None, False, 0
    position = _next_start(text, 0)
    for _ in range(_MAX_STARTS):
        if position == -1:
            break
        try:
            value, end = _DECODER.raw_decode(text, position)
        except (ValueError, RecursionError):
            found, end = None, position + 1
            # A repair that never closes walks to the end of the text; a few are enough.
            if unclosed_repairs < _MAX_UNCLOSED_REPAIRS:
                found, balanced = _parse_repaired(text, position)
                unclosed_repairs += not balanced
        else:
            items = _unwrap(value)
            found = None if items is None else _Found(slots=[(item, None) for item in items])
            saw_json = True
        saw_json = saw_json or found is not None
        if found is not None and found.slots:
            return found, True
        empty = empty or found
        position = _next_start(text, max(end, position + 1))
    return empty, saw_json


def _next_start(text: str, start: int) -> int:
    bracket, brace = text.find("[", start), text.find("{", start)
    if bracket == -1 or brace == -1:
        return max(bracket, brace)
    return min(bracket, brace)


def _parse_repaired(text: str, position: int) -> tuple[_Found | None, bool]:
    """Items from the repaired value at `position`, and whether its brackets closed."""
    repaired, balanced = _repair(text, position)
    if not repaired.startswith("["):
        return _decode_object(repaired, balanced=balanced), balanced
    found = _decode_array(repaired, 0, balanced=balanced)
    if not found.slots and not found.clean:
        found = None  # an unclosed [ in prose, not a cut-off answer
    return found, balanced


def _unwrap(value) -> list | None:
    """The list of candidate properties a decoded value holds, or None when it holds none."""
    if isinstance(value, list):
        return value if not value or any(isinstance(item, dict) for item in value) else None
    if not isinstance(value, dict):
        return None
    if _looks_like_property(value):
        return [value]
    inner = value.get("properties")
    if inner is None and len(value) == 1:
        inner = next(iter(value.values()))
    if isinstance(inner, dict) and _looks_like_property(inner):
        return [inner]
    if isinstance(inner, list):
        return _unwrap(inner)
    for inner in value.values():
        if isinstance(inner, list) and any(isinstance(i, dict) and _looks_like_property(i) for i in inner):
            return inner
    return None


def _looks_like_property(value) -> bool:
    return isinstance(value, dict) and ("property_description" in value or "behavior_type" in value)


def _decode_array(text: str, position: int, *, balanced: bool) -> _Found:
    """Decode the array at `position` one item at a time, keeping what is complete.

    `balanced` says whether the brackets around it close, which tells a malformed last
    item from one cut off by the token limit.
    """
    found = _Found(slots=[])
    index = position + 1
    length = len(text)
    while True:
        index = _skip_whitespace(text, index)
        if index >= length:
            break
        char = text[index]
        if char == "]":
            found.clean = all(broken is None for _, broken in found.slots)
            return found
        if char == ",":  # separators, also stray doubled ones
            index += 1
            continue
        try:
            item, index = _DECODER.raw_decode(text, index)
        except (ValueError, RecursionError):
            if char != "{":
                break  # prose or junk, not an item that was cut off
            resume = _resume_at(text, index + 1)
            if resume == -1:
                found.slots.append(
                    (None, "not valid JSON" if balanced else "cut off at the end of the answer")
                )
                found.clean = False
                return found
            found.slots.append((None, "not valid JSON"))
            index = resume
            continue
        found.slots.append((item, None))
    found.clean = False
    found.notes.append("the JSON array is not closed (the answer was probably cut off)")
    return found


def _resume_at(text: str, start: int) -> int:
    """The next { that decodes to a property-like object, or -1."""
    position = text.find("{", start)
    for _ in range(_MAX_RESUMES):
        if position == -1:
            return -1
        try:
            item, _ = _DECODER.raw_decode(text, position)
        except (ValueError, RecursionError):
            item = None
        if _looks_like_property(item):
            return position
        position = text.find("{", position + 1)
    return -1


def _decode_object(text: str, *, balanced: bool) -> _Found | None:
    """A repaired object: whole if it decodes, else the list inside a cut-off wrapper."""
    try:
        value, _ = _DECODER.raw_decode(text, 0)
    except (ValueError, RecursionError):
        pass
    else:
        items = _unwrap(value)
        return None if items is None else _Found(slots=[(item, None) for item in items])
    # Walk the members of {"properties": [ ... cut off ...]} or {"reasoning": "...", "x": [...
    index = 1
    while True:
        index = _skip_whitespace(text, index)
        if text.startswith(",", index):
            index = _skip_whitespace(text, index + 1)
        try:
            key, index = _DECODER.raw_decode(text, index)
        except (ValueError, RecursionError):
            return None
        index = _skip_whitespace(text, index)
        if not isinstance(key, str) or not text.startswith(":", index):
            return None
        index = _skip_whitespace(text, index + 1)
        try:
            value, index = _DECODER.raw_decode(text, index)
        except (ValueError, RecursionError):
            if not text.startswith("[", index):
                return None
            found = _decode_array(text, index, balanced=balanced)
            return found if found.slots else None
        items = _unwrap(value) if isinstance(value, list) else None
        if items:
            # The list is whole; the object around it broke further on.
            notes = ["the JSON object is not closed (the answer was probably cut off)"]
            return _Found(slots=[(item, None) for item in items], clean=False, notes=notes)


def _skip_whitespace(text: str, index: int) -> int:
    length = len(text)
    while index < length and text[index] in _WHITESPACE:
        index += 1
    return index


def _repair(text: str, position: int) -> tuple[str, bool]:
    """Rewrite the value at `position` as JSON: requote strings, drop trailing commas, map literals.

    Safe on valid JSON (it comes out unchanged in meaning), so it needs no guess about
    which slip the LLM made. It stops where the value's brackets balance, and says
    whether they did.
    """
    out = []
    depth = 0
    index = position
    length = len(text)
    while index < length:
        char = text[index]
        if char in _STRING_CLOSERS:
            piece, index = _read_string(text, index)
            out.append(piece)
            continue
        if char.isalpha() or char == "_":
            end = index + 1
            while end < length and (text[end].isalnum() or text[end] == "_"):
                end += 1
            word = text[index:end]
            out.append(_PYTHON_LITERALS.get(word, word))
            index = end
            continue
        if char == ",":
            after = _skip_whitespace(text, index + 1)
            if after < length and text[after] in "]}":
                index = after  # a trailing comma
                continue
        out.append(char)
        index += 1
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth <= 0:
                return "".join(out), True
    return "".join(out), False


def _read_string(text: str, start: int) -> tuple[str, int]:
    """Re-emit the string opened at `start` with JSON double quotes; (piece, index after it).

    A quote closes the string only when what follows could follow a JSON string, so an
    apostrophe in a single-quoted string, or a bare " inside a string, stays content.
    """
    closers = _STRING_CLOSERS[text[start]]
    out = ['"']
    index = start + 1
    length = len(text)
    while index < length:
        char = text[index]
        if char == "\\" and index + 1 < length:
            escaped = text[index + 1]
            if escaped == "'":
                out.append("'")
            elif escaped in _JSON_ESCAPES:
                out.append(char + escaped)
            else:
                out.append("\\\\" + escaped)
            index += 2
            continue
        if char in closers:
            after = _skip_whitespace(text, index + 1)
            if after >= length or text[after] in _AFTER_STRING:
                out.append('"')
                return "".join(out), index + 1
        out.append('\\"' if char == '"' else char)
        index += 1
    return "".join(out), length


def _validate(
    item, *, method: str, model_names: tuple[str, ...], question_id: str
) -> tuple[dict | None, str | None]:
    """(the normalised property, None) or (None, why the item is dropped)."""
    if not isinstance(item, dict):
        return None, f"not a JSON object (got {json_type(item)})"
    item = {_normalise_key(key): value for key, value in item.items()}
    description = item.get("property_description")
    if description is None:
        return None, "missing property_description"
    if not isinstance(description, str | int | float) or isinstance(description, bool):
        return None, f"property_description is not text (got {json_type(description)})"
    description = str(description).strip()
    if not description:
        return None, "empty property_description"
    behavior_type, problem = _behavior_type(item.get("behavior_type"))
    if problem:
        return None, problem
    model, problem = _model(item.get("model"), method=method, model_names=model_names)
    if problem:
        return None, problem
    prop = {
        "property_description": description,
        "category": _text(item.get("category")),
        "reason": _text(item.get("reason")),
        "evidence": _evidence(item.get("evidence")),
        "behavior_type": behavior_type,
        "contains_errors": _flag(item.get("contains_errors")),
        "unexpected_behavior": _flag(item.get("unexpected_behavior")),
        "model": model,
        "question_id": question_id,
    }
    return prop, None


def _normalise_key(key: str) -> str:
    key = str(key).strip().lower().replace(" ", "_").replace("-", "_")
    return _KEY_ALIASES.get(key, key)


def _behavior_type(value) -> tuple[str | None, str | None]:
    if value is None or value == "":
        return None, "missing behavior_type"
    letters = "".join(c for c in str(value).lower() if c.isalpha())
    behavior_type = _BEHAVIOR_BY_LETTERS.get(letters)
    if behavior_type is None:
        return None, f"unknown behavior_type {_short(value)!r}"
    return behavior_type, None


def _model(value, *, method: str, model_names: tuple[str, ...]) -> tuple[str | None, str | None]:
    if method != "side_by_side":
        return (str(model_names[0]) if model_names else ""), None
    if value is None or value == "":
        return None, "missing model (expected Model A or Model B)"
    wanted = str(value).strip().lower()
    for name in model_names:
        if wanted == str(name).strip().lower():
            return str(name), None
    side = _side(wanted)
    if side is None or side >= len(model_names):
        return None, f"cannot tell which model {_short(value)!r} means"
    return str(model_names[side]), None


def _side(label: str) -> int | None:
    """0 for "Model A", "model_a", "A", "Response A", "model A's response"...; 1 for B."""
    words = "".join(c if c.isalnum() else " " for c in label).split()
    words = [word for word in words if word not in _SIDE_FILLER_WORDS]
    if len(words) != 1:
        return None
    word = words[0]
    for filler in ("model", "response", "assistant"):  # "modela", "responseb"
        if word.startswith(filler) and len(word) == len(filler) + 1:
            word = word[-1]
    return {"a": 0, "b": 1}.get(word)


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return str(value)


def _evidence(value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        value = [value]
    quotes = [_text(quote) for quote in value]
    return [quote for quote in quotes if quote]


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "y", "1")
    return False
