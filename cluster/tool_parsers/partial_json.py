"""The top-level fields of a JSON object that is still being written, to stream a tool call as it comes: its name
once the name's string is whole, and its arguments' text as far as it goes."""
from __future__ import annotations

WHITESPACE = " \t\r\n"


def object_fields(text: str) -> dict[str, tuple[int, int | None]]:
    """Key -> (where its value starts in `text`, where it ends or None while cut short) for the object `text`
    opens with (after whitespace). Keys are read up to the first one whose value is not whole yet."""
    import json

    fields: dict[str, tuple[int, int | None]] = {}
    i = _skip(text, 0)
    if not text.startswith("{", i):
        return fields
    i += 1
    while True:
        i = _skip(text, i, WHITESPACE + ",")
        if not text.startswith('"', i):
            return fields  # the object's end, or not there yet
        key_end = _string_end(text, i)
        if key_end is None:
            return fields
        key = json.loads(text[i:key_end])
        i = _skip(text, key_end)
        if not text.startswith(":", i):
            return fields
        i = _skip(text, i + 1)
        if i >= len(text):
            return fields
        end = _value_end(text, i)
        fields[key] = (i, end)
        if end is None:
            return fields
        i = end


def _skip(text: str, i: int, chars: str = WHITESPACE) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """After the closing quote of the string opening at `i`."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """After the value starting at `i`; None while it may still go on."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # a number, true, false or null: whole once something follows it
    while j < len(text) and text[j] not in WHITESPACE + ",}]":
        j += 1
    return j if j < len(text) else None
