import gc
import json
import threading
from pathlib import Path

import pytest

from stringsight_site import perf

DEMO_PATH = Path(__file__).parent / "data" / "airline_data_demo.jsonl"


def test_json_loads_reads_the_demo_rows_exactly_as_the_standard_library_would():
    text = b"[" + b",".join(DEMO_PATH.read_bytes().splitlines()) + b"]"

    value = perf.json_loads(text)

    assert value == json.loads(text)
    assert repr(value) == repr(json.loads(text))  # also key order, and int against float


@pytest.mark.parametrize(
    "text",
    [
        b'{"score": 123456789012345678901234567890}',  # beyond 64 bits: orjson reads a float
        b'{"score":\n  -9223372036854775809}',
        b"[1, 18446744073709551616]",
        b"18446744073709551616",
        b'{"id": "1234567890123456789012", "n": 18446744073709551615}',
        b'{"phone": "call 00354750000000000003 today", "x": 0.12345678901234567890123}',
        b'{"a": 1, "b": 2, "a": 3}',
        b'{"big": 1e400, "tiny": 5e-324, "neg": -0.0}',  # 1e400: orjson refuses it, json reads inf
        b'"caf\\u00e9 \\ud83d\\ude00"',
    ],
)
def test_json_loads_gives_what_the_standard_library_gives(text):
    assert repr(perf.json_loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize("text", [b'{"score": NaN}', b'["\\ud800"]', b'{"a": 1', b"\xef\xbb\xbf[1]"])
def test_json_loads_leaves_what_orjson_refuses_to_the_fallback(text):
    seen = []

    def fallback(refused):
        seen.append(refused)
        return "the fallback's answer"

    assert perf.json_loads(text, fallback=fallback) == "the fallback's answer"
    assert seen == [text]


@pytest.mark.parametrize(
    ("text", "long_integer"),
    [
        (b"1234567890123456789", True),
        (b"[ -1234567890123456789]", True),
        (b'{"a":\n 12345678901234567890}', True),
        (b'{"a": 123456789012345678}', False),  # 18 digits fit in 64 bits
        (b'"a phone number 1234567890123456789 in text"', False),
        (b"1.1234567890123456789", False),  # a fraction: orjson reads it as json does
    ],
)
def test_may_hold_long_integer_finds_number_tokens_of_19_digits(text, long_integer):
    assert perf.may_hold_long_integer(text) is long_integer


def test_the_collector_stays_paused_until_every_pausing_thread_is_done():
    assert gc.isenabled()
    first_inside, second_done = threading.Event(), threading.Event()
    seen = {}

    def first():
        with perf.collector_paused():
            first_inside.set()
            second_done.wait(5)
            seen["after the second ended"] = gc.isenabled()

    thread = threading.Thread(target=first)
    thread.start()
    first_inside.wait(5)
    with perf.collector_paused():
        seen["both inside"] = gc.isenabled()
    second_done.set()
    thread.join(5)

    assert seen == {"both inside": False, "after the second ended": False}
    assert gc.isenabled()


def test_the_collector_stays_off_when_it_was_off_before():
    gc.disable()
    try:
        with perf.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
