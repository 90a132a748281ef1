"""A small writer of protobuf text format, for Triton's ``config.pbtxt``.

Triton's schema ships in tritonclient (``model_config_pb2``), which is a test-time dependency only, so the
configs are built as plain dicts and written here; the tests parse every written file strictly with
``google.protobuf.text_format`` against that schema.

Values: ``str`` is quoted, ``bool`` is ``true``/``false``, ``int``/``float`` are numbers, :class:`Enum` is a
bare identifier (``TYPE_FP32``), a ``dict`` is a message, a list of dicts is a repeated message, a list of
scalars is a repeated scalar. A protobuf map is a list of ``{"key": ..., "value": ...}`` dicts.
"""

from __future__ import annotations

import json


class Enum(str):
    """An enum value, written without quotes."""


def _scalar(v: object) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # A JSON string literal (UTF-8 kept as is) is a valid text-format string literal.
        return json.dumps(v, ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as a protobuf scalar")


def _lines(msg: dict, indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    for key, value in msg.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out += [f"{pad}{key} {{", *_lines(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:  # one block per element: valid for repeated messages and map entries
                out += [f"{pad}{key} {{", *_lines(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            if value:
                out.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            out.append(f"{pad}{key}: {_scalar(value)}")
    return out


def to_pbtxt(msg: dict) -> str:
    """The message as protobuf text format, ending with a newline."""
    return "\n".join(_lines(msg, 0)) + "\n"
