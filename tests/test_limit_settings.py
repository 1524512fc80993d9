"""The endpoint limit settings read from the environment (issue 14): a bad
value fails loudly, naming the variable."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from stringsight_site.settings import envcount, envlimits


def test_per_model_limits_are_read_from_json(monkeypatch):
    monkeypatch.setenv(
        "LIMITS", '{"gpt-4o": {"max_concurrency": 50, "rpm": 5000}, "gpt-4o-mini": {"tpm": 2e6}}'
    )

    assert envlimits("LIMITS") == {
        "gpt-4o": {"max_concurrency": 50.0, "rpm": 5000.0},
        "gpt-4o-mini": {"tpm": 2_000_000.0},
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not json", "LIMITS is not JSON; e.g. "),
        ("[1]", "LIMITS must map each model to its limits"),
        ('{"m": {}}', "LIMITS: 'm' must map to some of max_concurrency, rpm, tpm"),
        ('{"m": {"rps": 3}}', "LIMITS: 'm' has 'rps'; use max_concurrency, rpm, tpm"),
        ('{"m": {"rpm": 0}}', "LIMITS: 'm' rpm must be a number of at least 1"),
        ('{"m": {"rpm": true}}', "LIMITS: 'm' rpm must be a number of at least 1"),
    ],
)
def test_bad_per_model_limits_name_the_variable(monkeypatch, value, message):
    monkeypatch.setenv("LIMITS", value)

    with pytest.raises(ImproperlyConfigured) as refused:
        envlimits("LIMITS")

    assert str(refused.value).startswith(message)


def test_a_limit_is_a_whole_number_of_at_least_one_or_unset(monkeypatch):
    monkeypatch.delenv("COUNT", raising=False)
    assert envcount("COUNT") is None
    monkeypatch.setenv("COUNT", "24")
    assert envcount("COUNT") == 24
    monkeypatch.setenv("COUNT", "0")
    with pytest.raises(ImproperlyConfigured, match="COUNT=0 is below its minimum of 1"):
        envcount("COUNT")
