"""A small writer of protobuf text format, enough for Triton's ``config.pbtxt``.

A message is a ``dict`` (field -> value, in order); a repeated field is a ``list`` (of messages or
of scalars); an enum value is an :class:`Enum`; a map field (``parameters``) is a list of
``{"key": ..., "value": ...}`` messages. ``None`` values and empty lists are left out.
"""

from __future__ import annotations

import json


class Enum(str):
    """An enum value, written bare (``KIND_GPU``), not quoted."""


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        # Without control characters, JSON's escapes (\" and \\) are text format's; other text
        # is written as its UTF-8 bytes, which text format reads as they are.
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError(f"control character in {value!r}: not written to a model configuration")
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} in a text-format message")


def _message(fields: dict, depth: int) -> list[str]:
    pad = "  " * depth
    lines = []
    for key, value in fields.items():
        if value is None or (isinstance(value, list) and not value):
            continue
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", *_message(value, depth + 1), f"{pad}}}"]
        elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
            lines.append(f"{pad}{key} [")
            for index, item in enumerate(value):
                comma = "," if index < len(value) - 1 else ""
                lines += [f"{pad}  {{", *_message(item, depth + 2), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(item) for item in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def to_pbtxt(message: dict, comments: list[str] = ()) -> str:
    """``message`` as text format, after ``comments`` (each a ``#`` line)."""
    return "".join(f"# {line}\n" for line in comments) + "\n".join(_message(message, 0)) + "\n"
