"""Render a row into the readable transcript the extraction LLM is shown.

This runs once per row on the hot path, so it sticks to dict lookups and list joins,
and it never raises on odd shapes: whatever it cannot name is shown as compact JSON.
"""

import json

SIDE_LABELS = ("Model A", "Model B")

_IMAGE_PART_TYPES = ("image_url", "input_image", "image")
_TOOL_PART_TYPES = ("tool_use", "function_call", "tool_call")


def _compact(value) -> str:
    try:
        return json.dumps(_scrub(value), ensure_ascii=False, separators=(",", ":"), default=str)
    except (ValueError, RecursionError):  # circular or absurdly deep structures
        return "[unrenderable value]"


def _scrub(value, depth: int = 0):
    """Replace inline base64 payloads so they never reach the LLM's context."""
    if isinstance(value, str):
        return "[inline data]" if value.startswith("data:") and ";base64," in value[:200] else value
    if depth > 30:
        return "..."
    if isinstance(value, dict):
        return {key: _scrub(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item, depth + 1) for item in value]
    return value


def render_response(response) -> str:
    """A plain string, one message, or a list of OpenAI-shaped chat messages as readable text."""
    if response is None:
        return ""
    if isinstance(response, str):
        return response.strip()
    if isinstance(response, dict):
        if "role" not in response and "content" not in response:
            return _render_content(response, {})
        response = [response]
    if not isinstance(response, list | tuple):
        return _compact(response)
    call_names: dict[str, str] = {}
    blocks = []
    for message in response:
        block = _render_message(message, call_names)
        if block:
            blocks.append(block)
    return "\n\n".join(blocks)


def _render_message(message, call_names: dict[str, str]) -> str:
    if not isinstance(message, dict):
        return _render_content(message, call_names)
    role = message.get("role") or "message"
    name = message.get("name")
    tool_call_id = message.get("tool_call_id")
    if not name and tool_call_id is not None:
        name = call_names.get(str(tool_call_id))
    lines = []
    text = _render_content(message.get("content"), call_names)
    if text:
        lines.append(text)
    if message.get("tool_calls"):
        lines.extend(_render_tool_calls(message["tool_calls"], call_names))
    if isinstance(message.get("function_call"), dict):
        lines.append(_render_tool_call(message["function_call"], call_names))
    if not lines:
        return ""
    header = f"[{role}: {name}]" if name else f"[{role}]"
    return header + "\n" + "\n".join(lines)


def _render_content(content, call_names: dict[str, str]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, dict):
        return _render_part(content, call_names)
    if isinstance(content, list | tuple):
        parts = [_render_part(part, call_names) for part in content]
        return "\n".join(part for part in parts if part)
    return _compact(content)


def _render_part(part, call_names: dict[str, str]) -> str:
    if part is None:
        return ""
    if isinstance(part, str):
        return part.strip()
    if not isinstance(part, dict):
        return _render_content(part, call_names) if isinstance(part, list | tuple) else _compact(part)
    kind = part.get("type")
    if kind in _IMAGE_PART_TYPES:
        return _image_reference(part)
    if kind in _TOOL_PART_TYPES and "text" not in part:
        return _render_tool_call(part, call_names)
    if "text" not in part and "tool_calls" not in part:
        return _compact(part)
    lines = []
    text = part.get("text")
    if isinstance(text, str):
        text = text.strip()
    elif text is not None:
        text = _compact(text)
    if text:
        lines.append(text)
    if part.get("tool_calls"):
        lines.extend(_render_tool_calls(part["tool_calls"], call_names))
    return "\n".join(lines)


def _render_tool_calls(tool_calls, call_names: dict[str, str]) -> list[str]:
    if not isinstance(tool_calls, list | tuple):
        tool_calls = [tool_calls]
    return [_render_tool_call(call, call_names) for call in tool_calls]


def _render_tool_call(call, call_names: dict[str, str]) -> str:
    if not isinstance(call, dict):
        return f"call {_compact(call)}"
    function = call.get("function")
    if isinstance(function, dict):
        name, arguments = function.get("name"), function.get("arguments")
    else:
        name, arguments = call.get("name"), call.get("arguments", call.get("input"))
    name = str(name) if name else "unnamed_tool"
    call_id = call.get("id", call.get("call_id"))
    if call_id is not None:
        # Later calls may reuse an id (the demo's Claude rows use "0"); the latest one wins.
        call_names[str(call_id)] = name
    return f"call {name} with {_render_arguments(arguments)}"


def _render_arguments(arguments) -> str:
    if arguments is None:
        return "{}"
    if not isinstance(arguments, str):
        return _compact(arguments)
    arguments = arguments.strip()
    if not arguments:
        return "{}"
    if arguments[0] in "{[":
        try:
            return _compact(json.loads(arguments))
        except (ValueError, RecursionError):
            pass
    return arguments


def _image_reference(part: dict) -> str:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    source = part.get("source")
    if not url and isinstance(source, dict):
        url = source.get("url") or ("data:" if source.get("data") else None)
    if not url and part.get("file_id"):
        return f"[image: file {part['file_id']}]"
    if not isinstance(url, str) or not url:
        return "[image]"
    if url.startswith("data:"):
        return "[image: inline data]"
    return f"[image: {url}]"


def render_row(row: dict, method: str, *, include_scores: bool = False) -> str:
    """The user message for the extraction LLM: the prompt, the response(s), scores if asked."""
    prompt = row.get("prompt")
    lines = ["# User prompt", "" if prompt is None else str(prompt).strip(), ""]
    if method == "side_by_side":
        # Labels instead of real model names so the extraction LLM has no brand to favour.
        for label, column in zip(SIDE_LABELS, ("model_a_response", "model_b_response"), strict=True):
            lines += [f"=== {label} response ===", render_response(row.get(column))]
            lines += [f"=== end of {label} response ===", ""]
    elif method == "single_model":
        lines += ["# Model response", render_response(row.get("model_response")), ""]
    else:
        raise ValueError(f"method: unknown method {method!r}")
    if include_scores:
        score_lines = _score_lines(row, method)
        if score_lines:
            lines += ["# Scores", *score_lines]
    return "\n".join(lines).rstrip()


def _score_lines(row: dict, method: str) -> list[str]:
    if method == "single_model":
        score = row.get("score")
        return [] if score is None else [f"Scores: {_format_score(score)}"]
    lines = []
    for label, column in zip(SIDE_LABELS, ("score_a", "score_b"), strict=True):
        if row.get(column) is not None:
            lines.append(f"{label} scores: {_format_score(row[column])}")
    if row.get("winner") is not None:
        lines.append(f"Winner: {_winner_label(row)}")
    return lines


def _format_score(score) -> str:
    if not isinstance(score, dict):
        score = {"score": score}
    return json.dumps(score, ensure_ascii=False, default=str)


def _winner_label(row: dict) -> str:
    winner = str(row["winner"]).strip()
    lowered = winner.lower()
    for label, column, aliases in (
        ("Model A", "model_a", ("model_a", "model a", "a")),
        ("Model B", "model_b", ("model_b", "model b", "b")),
    ):
        name = row.get(column)
        if lowered in aliases or (name is not None and lowered == str(name).strip().lower()):
            return label
    if lowered.startswith("tie") or lowered == "draw":
        return "tie"
    return winner
