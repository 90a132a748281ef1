"""JSON request bodies parsed strictly: a client's malformed JSON is a 400, whatever its shape.

Two things the standard parser lets through are refused here: nesting deep enough to exhaust Python's
recursion limit (``[[[[...`` 100k deep raised RecursionError, a 500) and the non-standard literals ``NaN``,
``Infinity`` and ``-Infinity`` (not JSON, and never a valid pixel or token value).
"""

from __future__ import annotations

import json

from mae_deploy.serve.errors import ApiError


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; send finite values")


def parse_json(body: bytes | memoryview, code: str, what: str = "the body") -> object:
    """``body`` as a JSON document, or ApiError(400, ``code``) saying why it is not one."""
    try:
        return json.loads(bytes(body), parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, code, f"{what} nests JSON arrays or objects too deeply; send a flat document") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError, and so is a refused NaN
        raise ApiError(400, code, f"{what} is not valid JSON: {e}") from e
