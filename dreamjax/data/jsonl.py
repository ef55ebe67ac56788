"""TRL-format JSONL readers, validated line by line.

Preference lines: {"prompt": ..., "chosen": ..., "rejected": ...} where each value is a string, or
(conversational format) a list of {"role": str, "content": str} messages. General (replay) lines:
{"text": str}. A bad line raises `DataError` naming the file, the line number and the field; with
`skip_bad_lines=True` it is recorded (and counted) instead. Files are UTF-8 (a byte-order mark is
ignored), plain or gzip-compressed; `read_objects` is the reader every JSONL input goes through.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import os
from typing import Any, Callable, Iterator, Optional, Union
import zlib

Message = dict[str, str]
Turns = Union[str, list[Message]]

_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
  """A data file is malformed; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """One preference triplet: the context (prompt), the preferred and the rejected response."""

  prompt: Turns  # context: a string or a list of messages
  chosen: Turns  # preferred response: a string or a list of (assistant) messages
  rejected: Turns  # rejected response: same kind as `chosen`
  source: str = ""  # "file:line", for error messages and provenance


@dataclasses.dataclass(frozen=True)
class TextExample:
  """One general-data example (replay)."""

  text: str
  source: str = ""


@dataclasses.dataclass
class BadLines:
  """Bad lines skipped while reading, with their reasons."""

  count: int = 0
  reasons: list[str] = dataclasses.field(default_factory=list)

  def record(self, reason: str, record_file: Optional[str]) -> None:
    self.count += 1
    self.reasons.append(reason)
    if record_file:
      with open(record_file, "a", encoding="utf-8") as f:
        f.write(reason + "\n")


def check_turns(value: Any, where: str, field: str) -> Turns:
  """Returns a prompt/response value (a string or a list of {role, content} messages); DataError
  names `where` and the field when it is neither."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    if not value:
      raise DataError(f"{where}: field '{field}' is an empty message list; expected at least one message")
    for i, msg in enumerate(value):
      if not isinstance(msg, dict):
        raise DataError(
            f"{where}: field '{field}[{i}]' must be an object {{role, content}}, got {type(msg).__name__}"
        )
      for key in ("role", "content"):
        if key not in msg:
          raise DataError(f"{where}: field '{field}[{i}]' is missing '{key}'; expected {{role, content}}")
        if not isinstance(msg[key], str):
          raise DataError(
              f"{where}: field '{field}[{i}].{key}' must be a string, got {type(msg[key]).__name__}"
          )
      if msg["role"] not in _ROLES:
        raise DataError(f"{where}: field '{field}[{i}].role' is {msg['role']!r}; expected one of {_ROLES}")
    return value
  raise DataError(
      f"{where}: field '{field}' must be a string or a list of {{role, content}} messages, "
      f"got {type(value).__name__}"
  )


def _is_empty(turns: Turns) -> bool:
  if isinstance(turns, str):
    return not turns.strip()
  return all(not m["content"].strip() for m in turns)


def parse_preference(obj: Any, where: str) -> PreferenceExample:
  """Returns a validated PreferenceExample from one decoded JSON line."""
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object with prompt, chosen, rejected; got {type(obj).__name__}")
  for field in ("prompt", "chosen", "rejected"):
    if field not in obj:
      raise DataError(f"{where}: missing field '{field}'; expected keys prompt, chosen, rejected")
  prompt = check_turns(obj["prompt"], where, "prompt")
  chosen = check_turns(obj["chosen"], where, "chosen")
  rejected = check_turns(obj["rejected"], where, "rejected")
  if isinstance(chosen, str) != isinstance(rejected, str):
    raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
  for field, turns in (("chosen", chosen), ("rejected", rejected)):
    if _is_empty(turns):
      raise DataError(f"{where}: field '{field}' is empty; a response needs at least one token")
  return PreferenceExample(prompt, chosen, rejected, source=where)


def parse_text(obj: Any, where: str) -> TextExample:
  """Returns a validated TextExample from one decoded JSON line."""
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object with a 'text' field; got {type(obj).__name__}")
  if "text" not in obj:
    raise DataError(f"{where}: missing field 'text'; expected {{\"text\": str}}")
  if not isinstance(obj["text"], str):
    raise DataError(f"{where}: field 'text' must be a string, got {type(obj['text']).__name__}")
  if not obj["text"].strip():
    raise DataError(f"{where}: field 'text' is empty")
  return TextExample(obj["text"], source=where)


def _raw_lines(path: str) -> Iterator[bytes]:
  """Yields the raw lines of a file; gzip-compressed data (by its magic bytes) is decompressed."""
  with open(path, "rb") as f:
    compressed = f.read(2) == b"\x1f\x8b"
  if not compressed:
    with open(path, "rb") as f:
      yield from f
    return
  with gzip.open(path, "rb") as f:
    try:
      yield from f
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: gzip-compressed, but its data cannot be decompressed ({e})") from None


def read_objects(path: str, on_error: Optional[Callable[[DataError], None]] = None) -> Iterator[tuple[str, Any]]:
  """Yields ("file:line", decoded JSON value) for each non-blank line of a JSONL file.

  The one reader of the project's JSONL inputs: UTF-8 (a leading byte-order mark is ignored),
  plain or gzip-compressed (`.jsonl.gz`, recognised by its content). A line that is not UTF-8 or
  not JSON raises DataError naming the file, the line and the column, or, given on_error, is
  handed to it and skipped. A missing file or a folder is a DataError.
  """
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  if os.path.isdir(path):
    raise DataError(f"{path}: is a directory; expected a JSONL file")
  for lineno, raw in enumerate(_raw_lines(path), start=1):
    where = f"{path}:{lineno}"
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
      raw = raw[len(codecs.BOM_UTF8):]
    try:
      line = raw.decode("utf-8")
      if not line.strip():
        continue
      yield where, json.loads(line)
      continue
    except UnicodeDecodeError as e:
      error = DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); expected "
                        "UTF-8 JSON lines (was the file saved in another encoding?)")
    except json.JSONDecodeError as e:
      error = DataError(f"{where}: malformed JSON at column {e.colno}: {e.msg}")
    if on_error is None:
      raise error
    on_error(error)


def _read(path, parse, skip_bad_lines, bad_lines_file, bad):
  def skip(e: DataError) -> None:
    if not skip_bad_lines:
      raise e
    bad.record(str(e), bad_lines_file)

  out = []
  for where, obj in read_objects(path, on_error=skip):
    try:
      out.append(parse(obj, where))
    except DataError as e:
      skip(e)
  if not out:
    raise DataError(f"{path}: no valid examples (file is empty or every line was bad)")
  return out


def read_preferences(
    path: str, skip_bad_lines: bool = False, bad_lines_file: Optional[str] = None, bad: Optional[BadLines] = None
) -> list[PreferenceExample]:
  """Returns the preference examples of a TRL-format JSONL file (see module docstring)."""
  return _read(path, parse_preference, skip_bad_lines, bad_lines_file, bad if bad is not None else BadLines())


def read_texts(
    path: str, skip_bad_lines: bool = False, bad_lines_file: Optional[str] = None, bad: Optional[BadLines] = None
) -> list[TextExample]:
  """Returns the general-data examples of a JSONL file of {"text": ...} lines."""
  return _read(path, parse_text, skip_bad_lines, bad_lines_file, bad if bad is not None else BadLines())
