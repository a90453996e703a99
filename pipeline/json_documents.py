"""JSON documents a push brings (app.json, package.json), parsed so that no input ends in an internal error.

app.json is JSONC, as Dokku reads it (its own test apps have comments): JSON plus `//` and `/* */` comments
and trailing commas, nothing more (no JSON5 quotes or bare keys). Comments and trailing commas are blanked
out in place, so the standard library's strict parser (in C: 256 KiB in about a millisecond) reports errors
at the line and column the user sees. NaN and Infinity are refused, strings must be valid Unicode without NUL
(an environment cannot hold either), and nesting is bounded: the parser recurses.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pipeline.limits import MAX_JSON_DEPTH

# Python refuses to convert integers of more than 4300 digits anyway; no setting needs more than a few.
MAX_INTEGER_DIGITS = 100

# A string (kept), or a comment or a comma before a closing bracket (blanked). Strings come first, so `//`
# inside one is never taken for a comment; an unclosed comment runs to the end, so each character is scanned
# about once: the possessive and atomic parts never backtrack (no quadratic time on a file of `/*`).
_COMMENT = r"//[^\n]*|/\*(?:[^*]|\*(?!/))*+\*/"
_JSONC = re.compile(rf'"(?:[^"\\\n]|\\.)*+"|(//[^\n]*|/\*.*?(?:\*/|\Z)|,(?=(?>\s|{_COMMENT})*+[\]}}]))', re.DOTALL)


class JsonDocumentError(ValueError):
    """The document is not what the format allows; the message names the file and where."""


def parse_json(text: str, name: str, *, comments: bool = False) -> Any:
    """The value of the document `name`; with `comments`, as JSONC."""
    if comments:
        text = _JSONC.sub(lambda match: _blank(match, name), text)
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite, parse_int=_integer)
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" at")
        raise JsonDocumentError(f"{name} is not valid JSON: {what} at line {exc.lineno} "
                                f"column {exc.colno}") from None
    except RecursionError:
        raise _too_deep(name) from None
    except ValueError as exc:  # a constant or number refused below
        raise JsonDocumentError(f"{name} is not valid JSON: {exc}") from None
    _check(value, name)
    return value


def _blank(match: re.Match[str], name: str) -> str:
    if match[1] is None:
        return match[0]
    if match[1].startswith("/*") and (len(match[1]) < 4 or not match[1].endswith("*/")):
        line = match.string.count("\n", 0, match.start()) + 1
        raise JsonDocumentError(f"{name} is not valid JSON: the /* comment on line {line} is never closed")
    return re.sub(r"[^\n]", " ", match[1])  # newlines stay, so every line and column stays where it was


def _refuse_constant(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large a number")
    return number


def _integer(text: str) -> int:
    if len(text) > MAX_INTEGER_DIGITS:
        raise ValueError(f"a number of {len(text)} digits is too long")
    return int(text)


def _too_deep(name: str) -> JsonDocumentError:
    return JsonDocumentError(f"{name} nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects")


def _check(value: Any, name: str) -> None:
    """Walked without recursion: the depth bound and strings an environment and the database can hold."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep(name)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
            if isinstance(item, dict):
                pending.extend((key, depth) for key in item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise JsonDocumentError(f"{name}: a string holds a NUL character (\\u0000), which no command or "
                                        "environment can hold")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise JsonDocumentError(f"{name}: a string holds an unpaired surrogate escape (like \\ud800), "
                                        "which is not a character") from None
