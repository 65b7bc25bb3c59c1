"""Reading records from JSON arrays, JSONL and plain-text files with their line numbers.

JSONL is streamed line by line (SFT corpora are large); a JSON array has to be parsed whole, but
each element is decoded on its own with ``raw_decode`` so that every record still carries the
line it starts on. A ``.txt`` file is one prompt per non-empty line (the seed's
``human_eval_prompts.txt``).

Errors: a malformed JSONL line or bad UTF-8 on a line is *yielded* in place of the record as a
:class:`DataValidationError` (so the caller can skip it and go on reading); a JSON array that
does not parse raises a fatal one, because nothing after the error can be located reliably.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
from collections.abc import Iterator

from glm_megatron.data.errors import DataValidationError

_WS = " \t\r\n"


def _file_error(path: str, message: str, line: int | None = None) -> DataValidationError:
    return DataValidationError(message, path, line, reason="unreadable file", fatal=True)


def iter_json_records(path: str) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, record)`` for every record of ``path`` (``record`` may be a
    :class:`DataValidationError` for an unreadable line).

    Records of JSON/JSONL files are returned as parsed (callers check they are objects), so that
    type errors are reported by the format readers with their field names.
    """
    if not os.path.isfile(path):
        raise _file_error(path, "no such file")
    if path.endswith(".txt"):
        records = _iter_text_lines(path)
    else:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
        records = _iter_json_array(path) if head.startswith(b"[") else _iter_jsonl(path)
    count = 0
    for item in records:
        count += 1
        yield item
    if count == 0:  # an empty export or a wrong path glob: never a silently empty dataset
        raise _file_error(path, "empty input file (no records)")


def _decode_line(raw: bytes, path: str, lineno: int) -> str | DataValidationError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataValidationError(f"invalid UTF-8 at byte {e.start} of the line", path, lineno,
                                   reason="invalid UTF-8")


def _iter_jsonl(path: str) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM written by some editors
            text = _decode_line(raw, path, lineno)
            if isinstance(text, DataValidationError):
                yield lineno, text
                continue
            text = text.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                value = DataValidationError(f"malformed JSON: {e.msg} (column {e.colno})", path,
                                            lineno, reason="malformed JSON")
            yield lineno, value


def _iter_json_array(path: str) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _file_error(path, "invalid UTF-8", data[: e.start].count(b"\n") + 1) from None
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    expect_value = True
    while True:
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos >= n:
            raise _file_error(path, "malformed JSON array: missing closing ']'", line_of(pos))
        if text[pos] == "]":
            rest = text[pos + 1:].strip()
            if rest:
                raise _file_error(path, "malformed JSON: data after the closing ']'",
                                  line_of(pos + 1 + text[pos + 1:].index(rest[0])))
            return
        if not expect_value:
            if text[pos] != ",":
                raise _file_error(path, "malformed JSON array: expected ',' or ']'", line_of(pos))
            pos += 1
            expect_value = True
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _file_error(path, f"malformed JSON: {e.msg} (column {e.colno}); a JSON array "
                                    "cannot be read past an error", e.lineno) from None
        yield line_of(pos), value
        pos = end
        expect_value = False


def _iter_text_lines(path: str) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text = _decode_line(raw, path, lineno)
            if isinstance(text, DataValidationError):
                yield lineno, text
            elif text.strip():
                yield lineno, {"prompt": text.rstrip("\r\n")}


@contextlib.contextmanager
def atomic_output(path: str):
    """Write to ``path.tmp`` and rename on success: a run stopped by bad input leaves no
    half-written file that a later step could mistake for a finished one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl_line(f, record: dict) -> None:
    """One record per line, CJK kept readable (ensure_ascii=False)."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
