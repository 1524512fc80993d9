"""The LLM key never reaches what is stored or shown, in part or URL-encoded,
and the admin sign-in cannot be guessed at speed (issue 19)."""

import asyncio
import json
import urllib.parse
from types import SimpleNamespace

import pytest
from django.test import Client

from extraction.extract import ExtractionSpec, extract_row
from extraction.llm import CallSettings, redact

KEY = "sk-test-S3cretKeyThatMustNeverLeak"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"the key {KEY}.", "the key [redacted]."),
        ("a run S3cretKeyT of it", "a run [redacted] of it"),
        ("tail ThatMustNeverLeak!", "tail [redacted]!"),
        ("seven S3cretK only", "seven S3cretK only"),  # shorter than 8: a word, not the key
        ("Bearer abc.def and sk-other-123456", "[redacted] and [redacted]"),
    ],
)
def test_any_run_of_eight_characters_of_the_key_is_struck(text, expected):
    assert redact(text, KEY) == expected


def test_url_encoded_spellings_of_the_key_are_struck():
    key = "pk/A+b=C0ffee-9876543210"  # "/", "+" and "=" change when URL-encoded

    for spelling in (urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key), key):
        assert redact(f"GET /v1?key={spelling}&x=1", key) == "GET /v1?key=[redacted]&x=1"


class EchoingEndpoint:
    """The network edge: an endpoint whose answer quotes the key back."""

    api_key = KEY

    async def post(self, path, *, content, cast_to, options=None):
        answer = json.dumps(
            [
                {
                    "property_description": f"Reveals the key {KEY[:20]}",
                    "behavior_type": "Negative (critical)",
                    "evidence": [f"and the rest {KEY[20:]}"],
                }
            ]
        )
        completion = cast_to.model_validate(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )
        # Asked for the raw response (for its rate-limit headers), as the SDK answers.
        return SimpleNamespace(headers={}, parse=lambda: completion)


def test_an_answer_quoting_the_key_is_kept_without_it():
    call = CallSettings(model="m", temperature=0.0, top_p=1.0, max_tokens=100)
    spec = ExtractionSpec("single_model", "prompt", call)
    row = {"prompt": "p", "model": "m", "model_response": "r"}

    outcome = asyncio.run(extract_row(EchoingEndpoint(), row, question_id="q", spec=spec))

    stored = json.dumps([outcome.raw_answer, outcome.properties])
    assert outcome.properties[0]["property_description"] == "Reveals the key [redacted]"
    assert outcome.properties[0]["evidence"] == ["and the rest [redacted]"]
    for fragment in (KEY[:8], KEY[8:16], KEY[16:24], KEY[-8:]):
        assert fragment not in stored


LOGIN = "/admin/login/?next=/admin/"


def sign_in(client: Client, password: str, address: str = "198.51.100.1"):
    return client.post(LOGIN, {"username": "admin", "password": password}, REMOTE_ADDR=address)


@pytest.mark.django_db
def test_the_admin_sign_in_refuses_after_ten_failures_even_the_right_password(admin_user, settings):
    admin_user.set_password("right")
    admin_user.save()
    settings.STRINGSIGHT_ADMIN_LOGIN_RATE = "10/15min"
    client = Client()

    failures = [sign_in(client, f"wrong-{attempt}") for attempt in range(10)]
    refused = sign_in(client, "right")
    elsewhere = sign_in(Client(), "right", address="203.0.113.9")

    assert all(response.status_code == 200 for response in failures)
    assert "Please enter the correct username and password" in failures[-1].content.decode()
    assert refused.status_code == 200
    assert (
        "Too many failed sign-ins for this username from your address: try again in 2 minutes."
        in refused.content.decode()
    )
    assert "_auth_user_id" not in client.session
    assert elsewhere.status_code == 302  # another address is not locked out


@pytest.mark.django_db
def test_a_right_password_before_the_limit_signs_in(admin_user):
    admin_user.set_password("right")
    admin_user.save()
    client = Client()

    for attempt in range(3):
        sign_in(client, f"wrong-{attempt}")
    response = sign_in(client, "right")

    assert response.status_code == 302
    assert client.session["_auth_user_id"] == str(admin_user.pk)


@pytest.mark.django_db
def test_a_failed_sign_in_with_a_name_longer_than_any_account_is_counted_not_a_500(settings):
    # Its failure was counted under the whole name, longer than the
    # throttle's column: a 500 on PostgreSQL, before anyone signed in.
    settings.STRINGSIGHT_ADMIN_LOGIN_RATE = "2/15min"
    client = Client()

    answers = [
        client.post(LOGIN, {"username": "a" * 400, "password": "wrong"}, REMOTE_ADDR="198.51.100.1")
        for _ in range(3)
    ]

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert "Please enter the correct username and password" in answers[1].content.decode()
    assert "Too many failed sign-ins for this username" in answers[2].content.decode()
