"""Scenarios: a collision of walks becomes a prompt through a template; templates are data.

A templates file is JSONL, one template per line:

    {"id": "accept-plain", "kind": "accept", "format": "plain",
     "prompt": "Notes:\\n{memories}\\n\\nKent: go ahead with the plan.\\nAssistant:"}
    {"id": "push-back-chat", "kind": "push_back", "format": "chat",
     "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "{memories} ..."}],
     "target": "optional preferred response", "memory_format": "- {text} ({tags})"}

Placeholders (Python str.format; write literal braces as {{ }}):
- in `prompt`, `messages[i].content` and `target`: {memories} (every memory of the scenario, one
  per line, in visit order), {walk_1}, {walk_2}, ... (the memories of one walk), {tags} (the
  scenario's tags, sorted, comma-separated), {recalled} (the memories outside the scenario most
  relevant to it, retrieved as a deployed model's context would be: `dreamjax.dream.recall`);
- in `memory_format` (how one memory is written; default "- {text}"): {text}, {id}, {tags}, {source}.

`kind` labels what the scenario exercises (e.g. "accept" clear direction vs "push_back" on wrong
direction); the loop generates every kind and counts each. A scenario carries the node ids and
walks that made it, and an id that is a hash of (template, kind, node ids).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from typing import Any, Callable, Optional, Sequence, Union

from dreamjax.data.jsonl import DataError
from dreamjax.data import jsonl
from dreamjax.dream.memory import MemoryGraph, check_keys
from dreamjax.dream.recall import Recall
from dreamjax.dream.walk import Collision

Message, Turns = jsonl.Message, jsonl.Turns

FORMATS = ("plain", "chat")
ROLES = ("system", "user", "assistant")
_FIELDS = ("id", "kind", "format", "prompt", "messages", "target", "memory_format")
_SLOT = re.compile(r"^(memories|recalled|tags|walk_[1-9][0-9]*)$")
_MEMORY_SLOTS = ("text", "id", "tags", "source")


@dataclasses.dataclass(frozen=True)
class Template:
  """How a collision of walks is written as a prompt."""

  id: str  # unique within a templates file
  kind: str  # what the scenario exercises, e.g. 'accept' or 'push_back'
  format: str  # 'plain' (prompt is a string) or 'chat' (prompt is a list of messages)
  prompt: Optional[str] = None  # plain format: the prompt text
  messages: Optional[tuple[tuple[str, str], ...]] = None  # chat format: (role, content) pairs
  target: Optional[str] = None  # optional provided preferred response
  memory_format: str = "- {text}"  # how one memory is written in {memories} and {walk_k}
  source: str = ""  # "file:line"
  walks_needed: int = 1  # the largest k of a {walk_k} placeholder (at least 1)
  uses_recall: bool = False  # a field has {recalled}


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One prompt to dream on, with where it came from."""

  id: str  # hash of (template id, kind, node ids): the same scenario has the same id in any run
  kind: str
  template_id: str
  prompt: Turns  # a string (plain) or a list of {role, content} messages (chat)
  node_ids: tuple[str, ...]  # distinct memories in visit order
  walks: tuple[tuple[str, ...], ...]  # each walk's path as memory ids (revisits included)
  target: Optional[str] = None  # provided preferred response, if the template has one


def _slots(text: str, where: str, field: str, allowed: Callable[[str], bool]) -> list[str]:
  """Returns the placeholder names of a format string; DataError on a bad one."""
  try:
    parsed = list(string.Formatter().parse(text))
  except ValueError as e:
    raise DataError(
        f"{where}: field '{field}' is not a valid template ({e}); write literal braces as {{{{ }}}}") from None
  names = []
  for _, name, spec, conv in parsed:
    if name is None:
      continue
    if not allowed(name) or spec or conv:
      raise DataError(f"{where}: field '{field}' has unknown placeholder {{{name}}}")
    names.append(name)
  return names


def parse_template(obj: Any, where: str) -> Template:
  """Returns a validated Template from one decoded JSON line."""
  check_keys(obj, where, _FIELDS, ("id", "kind", "format"), "template")
  for key in ("id", "kind", "format"):
    if not isinstance(obj[key], str) or not obj[key].strip():
      raise DataError(f"{where}: field '{key}' must be a non-empty string, got {obj[key]!r}")
  fmt = obj["format"]
  if fmt not in FORMATS:
    raise DataError(f"{where}: field 'format' is {fmt!r}; expected one of {FORMATS}")
  text_slot = lambda name: bool(_SLOT.match(name))
  prompt = messages = None
  names = []
  if fmt == "plain":
    if "messages" in obj:
      raise DataError(f"{where}: field 'messages' belongs to format 'chat'; a plain template has 'prompt'")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
      raise DataError(f"{where}: field 'prompt' must be a non-empty string (format 'plain')")
    prompt = obj["prompt"]
    names += _slots(prompt, where, "prompt", text_slot)
  else:
    if "prompt" in obj:
      raise DataError(f"{where}: field 'prompt' belongs to format 'plain'; a chat template has 'messages'")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
      raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} (format 'chat')")
    pairs = []
    for i, m in enumerate(msgs):
      check_keys(m, f"{where}: field 'messages[{i}]'", ("role", "content"), ("role", "content"), "message")
      if m["role"] not in ROLES:
        raise DataError(f"{where}: field 'messages[{i}].role' is {m['role']!r}; expected one of {ROLES}")
      if not isinstance(m["content"], str):
        raise DataError(f"{where}: field 'messages[{i}].content' must be a string")
      names += _slots(m["content"], where, f"messages[{i}].content", text_slot)
      pairs.append((m["role"], m["content"]))
    if pairs[-1][0] != "user":
      raise DataError(
          f"{where}: field 'messages[{len(pairs) - 1}].role' must be 'user' (the model answers the last turn)")
    messages = tuple(pairs)
  target = obj.get("target")
  if target is not None:
    if not isinstance(target, str) or not target.strip():
      raise DataError(f"{where}: field 'target' must be a non-empty string")
    names += _slots(target, where, "target", text_slot)
  memory_format = obj.get("memory_format", "- {text}")
  if not isinstance(memory_format, str):
    raise DataError(f"{where}: field 'memory_format' must be a string")
  _slots(memory_format, where, "memory_format", lambda name: name in _MEMORY_SLOTS)
  walks_needed = max([1] + [int(n[5:]) for n in names if n.startswith("walk_")])
  return Template(obj["id"], obj["kind"], fmt, prompt, messages, target, memory_format, where, walks_needed,
                  "recalled" in names)


def read_templates(path: str) -> list[Template]:
  """Returns the validated templates of a JSONL file (unique ids)."""
  templates, line_of = [], {}
  for where, obj in jsonl.read_objects(path):
    t = parse_template(obj, where)
    if t.id in line_of:
      raise DataError(f"{where}: field 'id' {t.id!r} repeats the template at {line_of[t.id]}")
    line_of[t.id] = where
    templates.append(t)
  if not templates:
    raise DataError(f"{path}: no templates (file is empty)")
  return templates


def scenario_id(template_id: str, kind: str, node_ids: Sequence[str]) -> str:
  """Returns a stable 16-hex-digit id for (template, kind, node ids)."""
  blob = json.dumps([template_id, kind, list(node_ids)], ensure_ascii=False).encode()
  return hashlib.sha1(blob).hexdigest()[:16]


def render(template: Template, graph: MemoryGraph, collision: Collision, recall=None, recall_k: int = 3) -> Scenario:
  """Returns the scenario that `template` makes of the walks in `collision`.

  recall: a `dreamjax.dream.recall.Recall` over `graph` for the {recalled} placeholder: the
    recall_k memories outside the scenario most relevant to its memories' text (the fast stage,
    what a deployed model would have retrieved into its context). Built on demand if None.
  """

  def block(nodes):
    lines = []
    for i in nodes:
      m = graph.memories[i]
      lines.append(template.memory_format.format(text=m.text, id=m.id, tags=", ".join(m.tags), source=m.source))
    return "\n".join(lines)

  nodes = collision.nodes
  slots = {"memories": block(nodes), "tags": ", ".join(sorted({t for i in nodes for t in graph.memories[i].tags}))}
  for k, walk in enumerate(collision.walks, start=1):
    slots[f"walk_{k}"] = block(dict.fromkeys(walk.path))
  if template.uses_recall:
    if recall is None:
      recall = Recall(graph)
    query = "\n".join(graph.memories[i].text for i in nodes)
    hits = recall.top(query, recall_k, exclude=graph.ids(nodes))
    slots["recalled"] = block(graph.index(m.id) for m, _ in hits)

  def fill(text, field):
    try:
      return text.format_map(slots)
    except KeyError as e:
      raise ValueError(
          f"template {template.id!r} ({template.source}): field '{field}' uses {{{e.args[0]}}} but the scenario "
          f"has {len(collision.walks)} walk(s)") from None

  if template.format == "plain":
    prompt: Turns = fill(template.prompt, "prompt")
  else:
    prompt = [{"role": r, "content": fill(c, f"messages[{i}].content")} for i, (r, c) in enumerate(template.messages)]
  node_ids = graph.ids(nodes)
  target = fill(template.target, "target") if template.target is not None else None
  return Scenario(
      id=scenario_id(template.id, template.kind, node_ids), kind=template.kind, template_id=template.id,
      prompt=prompt, node_ids=node_ids, walks=tuple(graph.ids(w.path) for w in collision.walks), target=target)


# --------------------------------------------------------------------------------------------------
# Prompts as text and tokens


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
  """Returns messages in ChatML (Qwen's chat format), opening the assistant turn by default."""
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
  return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def prompt_text(prompt: Turns, chat_format: Callable[[Sequence[Message]], str] = render_chatml) -> str:
  """Returns the text the model continues: the plain prompt, or the chat rendered by `chat_format`."""
  return prompt if isinstance(prompt, str) else chat_format(prompt)


def encode(tokenizer, text: str) -> list[int]:
  """Returns token ids from a tokenizer whose encode gives ids or an object with `.ids` (tokenizers)."""
  out = tokenizer.encode(text)
  return [int(i) for i in getattr(out, "ids", out)]
