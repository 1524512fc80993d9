"""Performance tricks: code that does what plain code would, only faster,
kept here so the plain code elsewhere stays plain. Each says what it buys;
the figures are in BENCHMARKS.md ("What changed, and what it bought", and
the benchmark named).

Nothing here imports Django when it loads: `extraction/`, which is plain
Python, writes its JSON with these helpers.
"""

import contextlib
import gc
import json
import threading

import orjson

# JSON through orjson where it agrees with the standard library.
#
# orjson reads and writes JSON in C, several times faster than `json`; the
# start request's body (#5, and most of the gap to the naive pool in #7),
# the rows' stored text and every LLM request (the worker's CPU per row,
# #2) go through it. It does not always agree with `json`: it reads an
# integer beyond 64 bits as a float (json keeps it exact), and it refuses
# some values and text json accepts (integers beyond 64 bits, non-string
# keys; NaN, 1e400, unpaired surrogate escapes). These helpers use orjson
# only where the two agree, and json everywhere else, so callers see the
# standard library's values and messages.


def json_loads(text: bytes, *, fallback=json.loads):
    """The value of the UTF-8 JSON `text`, as `fallback` (json.loads or a
    stricter variant of it) would give it. Text orjson refuses goes to
    `fallback`, so its errors and messages are the ones callers see. The
    cyclic garbage collector is paused meanwhile (`collector_paused`)."""
    with collector_paused():
        if not may_hold_long_integer(text):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass
        return fallback(text)


def json_dumps(value) -> bytes:
    """`value` as compact UTF-8 JSON, the bytes of json.dumps(value,
    ensure_ascii=False, separators=(",", ":")) bar the spelling of some
    floats (1e-7 for 1e-07): orjson, and the standard library for what
    orjson refuses."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# Every digit becomes "0" and everything else " ", so that bytes.find looks
# for runs of digits in C: a regular expression over a large body costs
# several times as much, and this check runs over every start's whole body.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_RUN = b"0" * 19  # 2**63 has 19 digits
_BEFORE_NUMBER = frozenset(b"[:,")
_WHITESPACE = frozenset(b" \t\r\n")


def may_hold_long_integer(text: bytes) -> bool:
    """Whether a number of 19 digits or more may stand outside a string,
    where orjson would read it differently from json. Digits in strings
    count when they look like a value (after ": "); that only costs the
    slower reader."""
    digits = text.translate(_DIGITS_ONLY)
    at = digits.find(_LONG_RUN)
    while at != -1:
        before = at - 1
        if before >= 0 and text[before] == 0x2D:  # a minus sign
            before -= 1
        while before >= 0 and text[before] in _WHITESPACE:
            before -= 1
        if before < 0 or text[before] in _BEFORE_NUMBER:
            return True
        at = digits.find(b" ", at)
        at = -1 if at == -1 else digits.find(_LONG_RUN, at)
    return False


# The cyclic garbage collector.
#
# A full collection walks every object the process tracks. Reading a large
# start builds millions of objects, none of them garbage, and each of the
# collections that sets off would walk everything the web server holds (a
# large part of the start's parse, #5 and #7); a worker's full collections
# would walk all of Django, the SDK and every module, over and over, for
# objects that live as long as the process (a part of its CPU per row, #2).

_pause_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused():
    """No cyclic garbage collection in the process until every thread that
    paused it is done (reference counting still frees what it can)."""
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def freeze_long_lived_objects() -> None:
    """Hide every object the process holds now from the cyclic collector,
    for good: call it once the modules a process runs on are loaded. Later,
    short-lived objects are collected as before."""
    gc.collect()
    gc.freeze()


def load_urlconf() -> None:
    """Import the URLconf, and with it every view and serializer, when the
    web server loads rather than in each process's first request, which
    would otherwise wait for it."""
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 (reading it is what imports it)
