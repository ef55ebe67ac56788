"""Tokenisation of TRL-format examples with a model folder's tokenizer (and chat template).

Plain strings: context = tokens(prompt); response = tokens(response) + [eos]. Conversational
lists: the context is the chat template of the prompt messages with the generation prompt, and
the response is what the template adds for the response messages (the rendered prompt+response
minus the rendered prompt, as TRL does), so a model sees exactly its chat format.

Over-long examples: the context is cut from the left (the decision is made at its end) and the
response from the right, or, with `overlong='drop'`, the example is dropped; both are counted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

from dreamjax.data.jsonl import DataError, PreferenceExample, TextExample, Turns
from dreamjax.model.config import read_json_object
from dreamjax.train.batch import TokenizedExample

OVERLONG = ("truncate", "drop")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 `save_pretrained` writes the template
DEFAULT_TEMPLATE = "default"  # the name transformers uses when a folder holds several named templates


def _special_token(cfg: dict, field: str, path: str) -> Optional[str]:
  """Returns a special token of tokenizer_config.json: a string, {"content": string, ...} or null."""
  raw = value = cfg.get(field)
  if isinstance(value, dict):  # an AddedToken: {"content": ..., "special": ..., ...}
    value = value.get("content", raw)
  if value is not None and not isinstance(value, str):
    raise DataError(f"{path}: field '{field}' must be a token string, {{\"content\": string}} or null, "
                    f"got {json.dumps(raw)[:60]}")
  return value


def read_chat_template(folder: str, cfg: dict) -> Optional[str]:
  """Returns the chat template transformers would apply to `folder`'s conversations, or None.

  As `PreTrainedTokenizerBase.from_pretrained`: folder/chat_template.jinja, when present, wins over
  tokenizer_config.json's 'chat_template' (its decoded dict `cfg`); that field is a string, or
  several named templates ([{"name", "template"}, ...] or {name: template}) of which the one
  named 'default' is used.
  """
  path = os.path.join(folder, CHAT_TEMPLATE_FILE)
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        return f.read()
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text (at byte offset {e.start}); expected a jinja chat template") from None
  return _default_template(cfg.get("chat_template"), os.path.join(folder, TOKENIZER_CONFIG_FILE))


def _default_template(value, path: str) -> Optional[str]:
  """Returns the template of a tokenizer_config.json 'chat_template' value (see read_chat_template)."""
  where = f"{path}: field 'chat_template'"
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
               for t in value):
      raise DataError(f"{where}: a list must hold {{\"name\": string, \"template\": string}} objects")
    value = {t["name"]: t["template"] for t in value}
  if not isinstance(value, dict) or not all(isinstance(t, str) for t in value.values()):
    raise DataError(f"{where} must be a template string, or named templates, got {json.dumps(value)[:60]}")
  if DEFAULT_TEMPLATE not in value:
    raise DataError(f"{where} names templates {sorted(value)} but none is named {DEFAULT_TEMPLATE!r}; "
                    "add one (the template used for conversational data) or a chat_template.jinja")
  return value[DEFAULT_TEMPLATE]


class TextTokenizer:
  """A `tokenizers.Tokenizer` plus what tokenizer_config.json says (chat template, eos, pad)."""

  def __init__(self, tokenizer, chat_template: Optional[str] = None, eos_token: Optional[str] = None,
               pad_token: Optional[str] = None, bos_token: Optional[str] = None, source: str = ""):
    self.tokenizer, self.chat_template, self.source = tokenizer, chat_template, source
    self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
    self.eos_id = self._id(eos_token, "eos_token")
    self.pad_id = self._id(pad_token, "pad_token")

  def _id(self, token: Optional[str], field: str) -> Optional[int]:
    if token is None:
      return None
    i = self.tokenizer.token_to_id(token)
    if i is None:
      raise DataError(f"{self.source}: tokenizer_config.json field '{field}' is {token!r}, not a token of tokenizer.json")
    return i

  @classmethod
  def from_folder(cls, folder: str) -> "TextTokenizer":
    """Reads folder/tokenizer.json and, when present, tokenizer_config.json and chat_template.jinja."""
    from dreamjax.model import hf

    tok = hf.load_tokenizer(folder)
    path = os.path.join(folder, TOKENIZER_CONFIG_FILE)
    cfg = read_json_object(path, DataError) if os.path.isfile(path) else {}
    tokens = [_special_token(cfg, k, path) for k in ("eos_token", "pad_token", "bos_token")]
    return cls(tok, read_chat_template(folder, cfg), *tokens, source=folder)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool, where: str = "") -> str:
    """Returns the chat template rendered as transformers renders it (see _compile_chat_template)."""
    if not self.chat_template:
      raise DataError(f"{where}: conversational example, but {self.source} has no chat template (neither "
                      f"{CHAT_TEMPLATE_FILE} nor a 'chat_template' in {TOKENIZER_CONFIG_FILE}); use plain-string "
                      "prompt/chosen/rejected or add a template")
    import jinja2

    try:
      return _compile_chat_template(self.chat_template).render(
          messages=messages, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token or "",
          bos_token=self.bos_token or "")
    except jinja2.exceptions.TemplateError as e:
      raise DataError(f"{where}: chat template of {self.source} failed: {e}") from None


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str):
  """Returns the compiled template in the environment of transformers' `apply_chat_template`.

  Sandboxed jinja2 with trim_blocks and lstrip_blocks; {% break %} / {% continue %}; a `tojson`
  that does not HTML-escape (Qwen templates serialise tool calls with it); `raise_exception`,
  `strftime_now`, and the {% generation %} tag (rendered as its body: no assistant mask here).
  """
  import datetime

  import jinja2
  from jinja2 import ext, nodes, sandbox

  class Generation(ext.Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(msg):
    raise jinja2.exceptions.TemplateError(msg)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise jinja2.exceptions.TemplateError(f"line {e.lineno}: {e.message}") from None


@dataclasses.dataclass
class TokenStats:
  """What tokenisation did to the data: truncations and drops (logged and saved in the summary)."""

  examples: int = 0
  context_truncated: int = 0
  response_truncated: int = 0
  dropped_overlong: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _response_tokens(tok: TextTokenizer, prompt: Turns, response: Turns, where: str, field: str) -> list[int]:
  if isinstance(response, str):
    ids = tok.encode(response) + ([tok.eos_id] if tok.eos_id is not None else [])
  else:
    msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    head = tok.render_chat(msgs, add_generation_prompt=True, where=where)
    full = tok.render_chat(msgs + list(response), add_generation_prompt=False, where=where)
    if not full.startswith(head):
      raise DataError(f"{where}: field '{field}': the chat template does not render prompt + response as "
                      "an extension of the prompt; cannot tell which tokens are the response")
    ids = tok.encode(full[len(head):])
  if not ids:
    raise DataError(f"{where}: field '{field}' tokenises to no tokens; a response needs at least one")
  return ids


def _context_tokens(tok: TextTokenizer, prompt: Turns, where: str) -> list[int]:
  if isinstance(prompt, str):
    ids = tok.encode(prompt)
  else:
    ids = tok.encode(tok.render_chat(list(prompt), add_generation_prompt=True, where=where))
  if not ids:
    raise DataError(f"{where}: field 'prompt' tokenises to no tokens; the first response token needs a context")
  return ids


def _fit(ids: list[int], n: int, keep_end: bool) -> tuple[list[int], bool]:
  if len(ids) <= n:
    return ids, False
  return (ids[-n:] if keep_end else ids[:n]), True


def encode_preference(ex: PreferenceExample, tok: TextTokenizer, max_context_len: int, max_response_len: int,
                      overlong: str = "truncate", stats: Optional[TokenStats] = None) -> Optional[TokenizedExample]:
  """Returns the TokenizedExample of a preference example, or None when dropped as over-long."""
  if overlong not in OVERLONG:
    raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
  stats = stats if stats is not None else TokenStats()
  stats.examples += 1
  where = ex.source or "<example>"
  ctx = _context_tokens(tok, ex.prompt, where)
  chosen = _response_tokens(tok, ex.prompt, ex.chosen, where, "chosen")
  rejected = _response_tokens(tok, ex.prompt, ex.rejected, where, "rejected")
  ctx, cut_c = _fit(ctx, max_context_len, keep_end=True)
  chosen, cut_a = _fit(chosen, max_response_len, keep_end=False)
  rejected, cut_b = _fit(rejected, max_response_len, keep_end=False)
  if (cut_c or cut_a or cut_b) and overlong == "drop":
    stats.dropped_overlong += 1
    return None
  stats.context_truncated += int(cut_c)
  stats.response_truncated += int(cut_a or cut_b)
  return TokenizedExample(ctx, chosen, rejected)


def encode_text(ex: TextExample, tok: TextTokenizer, max_len: int, stats: Optional[TokenStats] = None
                ) -> Optional[TokenizedExample]:
  """Returns a general (SFT) example: the first token is the context, the rest (≤ max_len − 1) the response."""
  stats = stats if stats is not None else TokenStats()
  stats.examples += 1
  ids = tok.encode(ex.text) + ([tok.eos_id] if tok.eos_id is not None else [])
  if len(ids) < 2:
    raise DataError(f"{ex.source or '<text>'}: field 'text' tokenises to {len(ids)} token(s); need at least 2")
  ids, cut = _fit(ids, max_len, keep_end=False)
  stats.response_truncated += int(cut)
  return TokenizedExample(ids[:1], ids[1:], None)
