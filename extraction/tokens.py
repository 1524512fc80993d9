"""How many tokens a prompt is, before it is sent.

OpenAI's models are counted with their own encoding (o200k_base or
cl100k_base), which the quicktok package ships: nothing is downloaded at
run time. Other models are estimated at four characters a token, which is
what OpenAI-compatible servers commonly average on English text (and what
the LLM simulator counts); text in other scripts, or dense code, can take
more. A chat adds a few tokens per message (OpenAI's chat format: 3 per
message and 3 priming the answer).
"""

import functools
import math
from typing import Any

TOKENS_PER_MESSAGE = 3
TOKENS_PRIMING_THE_ANSWER = 3
CHARACTERS_PER_TOKEN = 4

# Model name prefixes and their encodings, longest first (as tiktoken maps them).
_ENCODINGS = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
)


def encoding_name(model: str) -> str | None:
    """The model's encoding, or None when it is not an OpenAI model we know."""
    name = model.lower().rsplit("/", 1)[-1]
    for prefix, encoding in _ENCODINGS:
        if name == prefix or name.startswith((f"{prefix}-", f"{prefix}.")):
            return encoding
    return None


@functools.cache
def _encoder(name: str):
    import quicktok

    return quicktok.get_encoding(name)


class PromptCounter:
    """Counts a model's prompts; `exact` says whether with its own encoding."""

    def __init__(self, model: str):
        self.model = model
        name = encoding_name(model)
        self._encoder = _encoder(name) if name else None

    @property
    def exact(self) -> bool:
        return self._encoder is not None

    def text(self, text: str) -> int:
        if self._encoder is not None:
            return self._encoder.count(text)
        return math.ceil(len(text) / CHARACTERS_PER_TOKEN)

    def messages(self, messages: list[dict[str, Any]]) -> int:
        return TOKENS_PRIMING_THE_ANSWER + sum(
            TOKENS_PER_MESSAGE + self.text(str(message.get("content") or "")) for message in messages
        )


@functools.lru_cache(maxsize=32)
def prompt_counter(model: str) -> PromptCounter:
    return PromptCounter(model)
