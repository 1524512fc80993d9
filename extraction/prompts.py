"""System prompts for property extraction and the JSON schema of the answer."""

from .parse import BEHAVIOR_TYPES
from .rows import METHODS

PROMPT_NAMES = ("default", "agent")
PROMPT_LABELS = {"default": "Default", "agent": "Agent"}
# How much of a prompt a picker shows (as upstream StringSight's /prompts does).
PREVIEW_LENGTH = 180

# What a task-description field starts with, per prompt and method: a
# frontend pre-fills it, and the text sent back lands in the prompt's task
# section. A job without a task description has no such section.
DEFAULT_TASK_DESCRIPTIONS = {
    ("default", "single_model"): (
        "Find the notable behaviours of a model's answers to its users' prompts: what it gets right, "
        "where it goes wrong, and how it communicates."
    ),
    ("default", "side_by_side"): (
        "Compare two models' answers to the same prompts: find the behaviours that set one apart from "
        "the other in correctness, reasoning, honesty and style."
    ),
    ("agent", "single_model"): (
        "An AI agent helps users by calling tools under an operating policy. Find the behaviours that "
        "explain whether it completed the user's task correctly and within the policy."
    ),
    ("agent", "side_by_side"): (
        "Two AI agents handle the same user tasks with tools under an operating policy. Find the "
        "behaviours that set one agent apart from the other in task success, policy and tool use."
    ),
}

# A value this short with no whitespace reads as a prompt name, never as prompt text.
_NAME_MAX_LENGTH = 40

_INTRO = {
    ("default", "single_model"): (
        "You study how language models behave. You will read a user's prompt and one model's "
        "response to it. List the distinctive behaviours of that response: what it does well, "
        "where it goes wrong, and how it communicates. Each behaviour must be concrete and "
        "observable, something another reader could verify in the transcript."
    ),
    ("default", "side_by_side"): (
        "You study how language models behave. You will read a user's prompt and two responses "
        "to it, labelled Model A and Model B. List the behaviours that set each response apart "
        "from the other: what one does well or badly where the other does not, and how their "
        "styles differ. Each behaviour belongs to exactly one of the two responses and must be "
        "something another reader could verify in the transcript."
    ),
    ("agent", "single_model"): (
        "You review transcripts of AI agents that act through tools: the agent talks with a user, "
        "calls functions, reads their results and must follow an operating policy. You will read "
        "the task prompt and the agent's whole trajectory. List the distinctive behaviours of the "
        "agent, judged by what it actually did, not by what it said it would do."
    ),
    ("agent", "side_by_side"): (
        "You review transcripts of AI agents that act through tools: each agent talks with a user, "
        "calls functions, reads their results and must follow an operating policy. You will read "
        "the task prompt and two trajectories for it, labelled Model A and Model B. List the "
        "behaviours that set each agent apart from the other, judged by what it actually did. "
        "Each behaviour belongs to exactly one of the two agents."
    ),
}

_FOCUS = {
    "default": (
        "Things worth noticing:\n"
        "- whether the answer is correct and complete, and answers what was actually asked;\n"
        "- the reasoning: unsupported claims, contradictions, invented facts, sources or numbers;\n"
        "- how it deals with ambiguity, missing information, or a request it should decline;\n"
        "- honesty: overconfidence, excessive hedging, admitting what it does not know;\n"
        "- style a reader would notice: structure, length, tone, formatting.\n"
        'Avoid vague verdicts such as "the answer is helpful"; name the specific behaviour instead.'
    ),
    "agent": (
        "Things worth noticing:\n"
        "- tool use: the right tool with the right arguments, in a sensible order; needless, "
        "repeated or missing calls (acting before looking up what it needs);\n"
        "- policy: whether it follows the rules given in the system or policy message, or breaks them;\n"
        "- consent: whether it asks the user to confirm before an action that changes something "
        "(booking, cancelling, charging, sending);\n"
        "- grounding: whether it reports tool results faithfully or invents data, results or "
        "actions it never took;\n"
        "- the dialogue: asking for missing details, handling errors and refusals, handing over "
        "to a human when it should, ending the conversation properly;\n"
        "- the outcome: whether the user ends up with what they asked for.\n"
        "Prefer behaviours that explain why the task succeeded or failed."
    ),
}

_FIELDS = (
    '- "property_description": one short sentence of 20 words or fewer saying what the model does, '
    "in what situation, and with what consequence "
    '(for example "Cancels the booking without asking for confirmation, leaving the user no chance '
    'to object");\n'
    '- "category": a short label of one to four words that groups similar behaviours '
    '(for example "Tool use", "Policy", "Tone");\n'
    '- "reason": one sentence on why the behaviour matters to a user or a developer;\n'
    '- "evidence": a list of short quotes copied word for word from the transcript that show it;\n'
    '- "behavior_type": exactly one of "Positive", "Negative (critical)", '
    '"Negative (non-critical)", "Style";\n'
    '- "contains_errors": true if the behaviour is or includes a mistake (a wrong fact, faulty '
    "reasoning, a wrong or failed tool call), otherwise false;\n"
    '- "unexpected_behavior": true if the behaviour is strange for this kind of task (looping, '
    "switching language, fabricating data, ignoring the user), otherwise false"
)

_MODEL_FIELD = ';\n- "model": "Model A" or "Model B", the response the behaviour belongs to'

_OUTPUT = (
    "Answer format: you may first think briefly in plain text, a few sentences at most. Then give "
    "your answer as JSON: one JSON array of 3 to 10 objects, inside a ```json code block, with "
    "nothing after it. Use double quotes and no comments. Each object has exactly these fields:\n"
)


class UnknownPromptError(ValueError):
    """A system_prompt value that looks like a prompt name but names no known prompt."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(
            f"system_prompt: unknown prompt name {name!r}; known names: {', '.join(PROMPT_NAMES)} "
            "(send custom_system_prompt for literal text)"
        )


def _task_section(task_description: str | None) -> str:
    task_description = (task_description or "").strip()
    if not task_description:
        return ""
    return (
        f"What the evaluated model was asked to do:\n{task_description}\n"
        "Judge each behaviour with that task in mind."
    )


def named_prompt(name: str, method: str, *, task_description: str | None = None) -> str:
    """The text of a named prompt for a method, with the task description placed inside."""
    if name not in PROMPT_NAMES:
        raise UnknownPromptError(name)
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    fields = _FIELDS + (_MODEL_FIELD if method == "side_by_side" else "") + "."
    sections = [_INTRO[name, method], _task_section(task_description), _FOCUS[name], _OUTPUT + fields]
    return "\n\n".join(section for section in sections if section)


def resolve_system_prompt(
    system_prompt: str | None,
    method: str,
    *,
    task_description: str | None = None,
    custom_system_prompt: str | None = None,
) -> str:
    """The system prompt to send: custom text, a named prompt, or literal prompt text."""
    if custom_system_prompt and custom_system_prompt.strip():
        sections = [custom_system_prompt.strip(), _task_section(task_description)]
        return "\n\n".join(section for section in sections if section)
    value = (system_prompt or "").strip()
    if not value:
        return named_prompt("default", method, task_description=task_description)
    if value.lower() in PROMPT_NAMES:
        return named_prompt(value.lower(), method, task_description=task_description)
    is_clearly_text = "\n" in value or (len(value) > _NAME_MAX_LENGTH and any(c.isspace() for c in value))
    if not is_clearly_text:
        # Upstream sent a misspelled name to the LLM as its whole prompt; refuse instead.
        raise UnknownPromptError(value)
    return value


def list_prompts(task_description: str | None = None) -> list[dict]:
    """Every named prompt for every method, for clients that show or pick one."""
    return [
        {
            "name": name,
            "method": method,
            "text": named_prompt(name, method, task_description=task_description),
        }
        for name in PROMPT_NAMES
        for method in METHODS
    ]


def prompt_catalogue() -> list[dict]:
    """The named prompts as a picker lists them (the StringSight frontend's
    /prompts): a label, whether a task description goes in, a preview of the
    single-model text and the task description each method starts with."""
    return [
        {
            "name": name,
            "label": PROMPT_LABELS[name],
            "has_task_description": True,
            "preview": named_prompt(name, "single_model")[:PREVIEW_LENGTH],
            "default_task_description_single": DEFAULT_TASK_DESCRIPTIONS[name, "single_model"],
            "default_task_description_sbs": DEFAULT_TASK_DESCRIPTIONS[name, "side_by_side"],
        }
        for name in PROMPT_NAMES
    ]


def property_json_schema(method: str) -> dict:
    """The JSON schema of the answer, in the strict subset OpenAI structured outputs accept."""
    item_fields = {
        "property_description": {"type": "string"},
        "category": {"type": "string"},
        "reason": {"type": "string"},
        "evidence": {"type": "array", "items": {"type": "string"}},
        "behavior_type": {"type": "string", "enum": list(BEHAVIOR_TYPES)},
        "contains_errors": {"type": "boolean"},
        "unexpected_behavior": {"type": "boolean"},
    }
    if method == "side_by_side":
        item_fields["model"] = {"type": "string", "enum": ["Model A", "Model B"]}
    return {
        "type": "object",
        "properties": {
            "properties": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": item_fields,
                    "required": list(item_fields),
                    "additionalProperties": False,
                },
            }
        },
        "required": ["properties"],
        "additionalProperties": False,
    }


def response_format(method: str) -> dict:
    """The `response_format` argument for a structured-output chat completion."""
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return {
        "type": "json_schema",
        "json_schema": {"name": "properties", "strict": True, "schema": property_json_schema(method)},
    }
