"""The training-signal agent: scorers of (scenario, response), higher is better.

The protocol is one method, `score(scenario, response) -> float | Score` (a Score adds a reason).
A scorer may also have `score_batch(items) -> list[Score]` for a list of (scenario, response)
pairs; `score_all` uses it when present. Built-ins:

- `RuleScorer`: regex / keyword rules from a JSONL file, each with a weight and the kinds it
  applies to; the score is the sum of the weights of the rules that match.
- `ModelJudgeScorer`: log p(yes) − log p(no) that a model (the current one or a frozen copy)
  gives to the continuations of a judgement template.
- `CommandScorer`: any external grader: JSON lines in on stdin, one JSON value per line out.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import subprocess
from typing import Any, NamedTuple, Optional, Protocol, Sequence, Union, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax import objectives
from dreamjax.data.jsonl import DataError
from dreamjax.data import jsonl
from dreamjax.dream.memory import check_keys
from dreamjax.dream.scenario import Scenario, encode, prompt_text, render_chatml
from dreamjax.model import forward, lm_head, positions_from_mask


class Score(NamedTuple):
  """A scorer's verdict on one response."""

  value: float  # higher is better; finite
  reason: str = ""  # why, for provenance and debugging


class ScorerError(RuntimeError):
  """A scorer failed or returned something that is not a score; the message says which and where."""


@runtime_checkable
class Scorer(Protocol):
  """Scores one response to one scenario."""

  def score(self, scenario: Scenario, response: str) -> Union[float, Score]:
    ...


def as_score(result: Any, who: str) -> Score:
  """Returns `result` (a number, a Score or a (value, reason) pair) as a Score with a finite value."""
  reason = ""
  if isinstance(result, tuple):
    if len(result) != 2:
      raise ScorerError(f"{who}: returned a tuple of {len(result)}; expected (score, reason)")
    result, reason = result
  if isinstance(result, bool) or not isinstance(result, (int, float, np.number)) or not math.isfinite(result):
    raise ScorerError(f"{who}: score must be a finite number, got {result!r}")
  return Score(float(result), str(reason))


def score_all(scorer, items: Sequence[tuple[Scenario, str]]) -> list[Score]:
  """Returns a Score per (scenario, response), batched when the scorer has score_batch."""
  who = type(scorer).__name__
  if hasattr(scorer, "score_batch"):
    out = list(scorer.score_batch(items))
    if len(out) != len(items):
      raise ScorerError(f"{who}.score_batch: returned {len(out)} scores for {len(items)} responses")
    return [as_score(s, who) for s in out]
  return [as_score(scorer.score(sc, r), who) for sc, r in items]


# --------------------------------------------------------------------------------------------------
# Rules

_RULE_FIELDS = ("name", "pattern", "keywords", "weight", "kinds", "case_sensitive")


class Rule(NamedTuple):
  """One rule: when `regex` matches a response to a scenario of one of `kinds`, add `weight`."""

  name: str
  regex: re.Pattern
  weight: float
  kinds: Optional[frozenset[str]]  # None: every kind
  source: str  # "file:line"


def parse_rule(obj: Any, where: str) -> Rule:
  """Returns a validated Rule from one decoded JSON line.

  {"name": str, "pattern": regex | "keywords": [str, ...], "weight": number,
   "kinds": [str, ...] (optional, default every kind), "case_sensitive": bool (default false)}
  Keywords match as whole words.
  """
  check_keys(obj, where, _RULE_FIELDS, ("name", "weight"), "rule")
  if not isinstance(obj["name"], str) or not obj["name"].strip():
    raise DataError(f"{where}: field 'name' must be a non-empty string")
  weight = obj["weight"]
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
    raise DataError(f"{where}: field 'weight' must be a finite number, got {weight!r}")
  case = obj.get("case_sensitive", False)
  if not isinstance(case, bool):
    raise DataError(f"{where}: field 'case_sensitive' must be true or false, got {case!r}")
  flags = 0 if case else re.IGNORECASE
  if ("pattern" in obj) == ("keywords" in obj):
    raise DataError(f"{where}: a rule needs exactly one of fields 'pattern' (regex) and 'keywords' (list)")
  if "pattern" in obj:
    if not isinstance(obj["pattern"], str) or not obj["pattern"]:
      raise DataError(f"{where}: field 'pattern' must be a non-empty string")
    try:
      regex = re.compile(obj["pattern"], flags)
    except re.error as e:
      raise DataError(f"{where}: field 'pattern' is not a valid regex: {e}") from None
  else:
    kws = obj["keywords"]
    if not isinstance(kws, list) or not kws:
      raise DataError(f"{where}: field 'keywords' must be a non-empty list of strings")
    for i, k in enumerate(kws):
      if not isinstance(k, str) or not k.strip():
        raise DataError(f"{where}: field 'keywords[{i}]' must be a non-empty string, got {k!r}")
    regex = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(k) for k in kws) + r")(?!\w)", flags)
  kinds = obj.get("kinds")
  if kinds is not None:
    if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) and k for k in kinds):
      raise DataError(f"{where}: field 'kinds' must be a non-empty list of kind names")
    kinds = frozenset(kinds)
  return Rule(obj["name"], regex, float(weight), kinds, where)


class RuleScorer:
  """Sum of the weights of the rules matching the response (rules for other kinds are skipped)."""

  def __init__(self, rules: Sequence[Rule], base: float = 0.0):
    self.rules, self.base = tuple(rules), float(base)

  @classmethod
  def from_file(cls, path: str, base: float = 0.0) -> "RuleScorer":
    """Returns a RuleScorer with the rules of a JSONL file (see `parse_rule`); names are unique."""
    rules, line_of = [], {}
    for where, obj in jsonl.read_objects(path):
      rule = parse_rule(obj, where)
      if rule.name in line_of:
        raise DataError(f"{where}: field 'name' {rule.name!r} repeats the rule at {line_of[rule.name]}")
      line_of[rule.name] = where
      rules.append(rule)
    if not rules:
      raise DataError(f"{path}: no rules (file is empty)")
    return cls(rules, base)

  def score(self, scenario: Scenario, response: str) -> Score:
    value, hits = self.base, []
    for rule in self.rules:
      if (rule.kinds is None or scenario.kind in rule.kinds) and rule.regex.search(response):
        value += rule.weight
        hits.append(f"{rule.name}({rule.weight:+g})")
    return Score(value, " ".join(hits) or "no rule matched")


# --------------------------------------------------------------------------------------------------
# Model judge

DEFAULT_JUDGE = (
    "{prompt}{response}\n\nQuestion: is the reply above the right response for a '{kind}' situation? "
    "Answer:")


@functools.partial(jax.jit, static_argnames=("config",))
def _continuation_logprobs(params, tokens_BxT, mask_BxT, label_mask_BxT, *, config):
  """Returns the summed log-probability of the tokens where label_mask is 1 (each given its prefix)."""
  out = forward(params, tokens_BxT, positions_from_mask(mask_BxT), mask_BxT, config=config, head=False)
  lp = objectives.linear_sequence_logprobs(out.head_input[:, :-1], lm_head(params, config), tokens_BxT[:, 1:],
                                    label_mask_BxT[:, 1:])
  return lp.sum_B


class ModelJudgeScorer:
  """log p(yes) − log p(no) that a model gives to the continuations of a judgement prompt.

    judge_text = template.format(prompt=<prompt as text>, response=..., kind=...)
    score      = Σ log p(yes tokens | judge_text) − Σ log p(no tokens | judge_text)

  Pass the current params for self-judgement or a frozen copy (e.g. the base model); `params`
  may be replaced between rounds. Contexts longer than max_context tokens keep their end.

  Args:
    template: a format string with {prompt}, {response} and {kind}, or a dict kind -> template
      (a kind missing from the dict is an error).
    yes, no: the two continuations compared (their first tokens should differ).
    batch_size, pad_multiple: fixed batch and length buckets, so scoring compiles rarely.
  """

  def __init__(self, params, config, tokenizer, template: Union[str, dict[str, str]] = DEFAULT_JUDGE,
               yes: str = " yes", no: str = " no", chat_format=render_chatml, max_context: int = 1024,
               batch_size: int = 8, pad_multiple: int = 64):
    self.params, self.config, self.tokenizer = params, config, tokenizer
    self.template, self.chat_format = template, chat_format
    self.yes_ids, self.no_ids = encode(tokenizer, yes), encode(tokenizer, no)
    if not self.yes_ids or not self.no_ids:
      raise ValueError(f"ModelJudgeScorer: yes={yes!r} and no={no!r} must each encode to at least one token")
    self.max_context, self.batch_size, self.pad_multiple = max_context, batch_size, pad_multiple

  def _context(self, scenario: Scenario, response: str) -> list[int]:
    template = self.template
    if isinstance(template, dict):
      if scenario.kind not in template:
        raise ScorerError(f"ModelJudgeScorer: no judgement template for kind {scenario.kind!r}")
      template = template[scenario.kind]
    text = template.format(prompt=prompt_text(scenario.prompt, self.chat_format), response=response,
                           kind=scenario.kind)
    return encode(self.tokenizer, text)[-self.max_context:]

  def score(self, scenario: Scenario, response: str) -> Score:
    return self.score_batch([(scenario, response)])[0]

  def score_batch(self, items: Sequence[tuple[Scenario, str]]) -> list[Score]:
    seqs = []  # (tokens, number of continuation tokens), yes then no for each item
    for scenario, response in items:
      ctx = self._context(scenario, response)
      seqs += [(ctx + self.yes_ids, len(self.yes_ids)), (ctx + self.no_ids, len(self.no_ids))]
    width = -(-max(len(s) for s, _ in seqs) // self.pad_multiple) * self.pad_multiple
    rows = 2 * self.batch_size
    lps = []
    for at in range(0, len(seqs), rows):
      chunk = seqs[at:at + rows]
      chunk += [chunk[-1]] * (rows - len(chunk))  # fixed batch: one compilation
      toks, mask, label = (np.zeros((rows, width), np.int32) for _ in range(3))
      for r, (s, n) in enumerate(chunk):  # right-padded: the real tokens never see the pads
        toks[r, :len(s)], mask[r, :len(s)], label[r, len(s) - n:len(s)] = s, 1, 1
      out = _continuation_logprobs(self.params, jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(label),
                                   config=self.config)
      lps += np.asarray(out).tolist()[:len(seqs) - at]
    return [Score(y - n, f"log p(yes)={y:.3f} log p(no)={n:.3f}") for y, n in zip(lps[0::2], lps[1::2])]


# --------------------------------------------------------------------------------------------------
# External command


class CommandScorer:
  """Scores with an external program: one JSON object per line in, one JSON value per line out.

  Input lines (stdin): {"id", "kind", "prompt", "response", "node_ids", "target"} — `prompt` is a
  string or a list of {role, content} messages. Output (stdout): one line per input line, in
  order, each a number or {"score": number, "reason": str}. The program runs once per batch; a
  non-zero exit, a timeout, or output that is not that raises ScorerError naming the command and
  the output line.
  """

  def __init__(self, command: Union[str, Sequence[str]], timeout: float = 60.0, batch_size: int = 64):
    self.command = shlex.split(command) if isinstance(command, str) else list(command)
    if not self.command:
      raise ValueError("CommandScorer: empty command")
    self.timeout, self.batch_size = float(timeout), batch_size

  @property
  def name(self) -> str:
    return shlex.join(self.command)

  def score(self, scenario: Scenario, response: str) -> Score:
    return self.score_batch([(scenario, response)])[0]

  def score_batch(self, items: Sequence[tuple[Scenario, str]]) -> list[Score]:
    out = []
    for at in range(0, len(items), self.batch_size):
      out += self._run(items[at:at + self.batch_size])
    return out

  def _run(self, items) -> list[Score]:
    lines = [json.dumps({"id": sc.id, "kind": sc.kind, "prompt": sc.prompt, "response": r,
                         "node_ids": list(sc.node_ids), "target": sc.target}, ensure_ascii=False)
             for sc, r in items]
    try:
      proc = subprocess.run(self.command, input="\n".join(lines) + "\n", capture_output=True, text=True,
                            timeout=self.timeout)
    except subprocess.TimeoutExpired:
      raise ScorerError(f"CommandScorer `{self.name}`: no answer within {self.timeout:g} s "
                        f"({len(items)} responses); raise timeout= or speed the grader up") from None
    except OSError as e:
      raise ScorerError(f"CommandScorer `{self.name}`: cannot run: {e}") from None
    if proc.returncode != 0:
      raise ScorerError(f"CommandScorer `{self.name}`: exited with status {proc.returncode}; stderr: "
                        f"{proc.stderr.strip()[-500:]!r}")
    answers = [(n, l) for n, l in enumerate(proc.stdout.splitlines(), start=1) if l.strip()]
    if len(answers) != len(items):
      raise ScorerError(f"CommandScorer `{self.name}`: wrote {len(answers)} output lines for {len(items)} "
                        f"input lines; expected one JSON value per input line")
    scores = []
    for n, line in answers:
      where = f"CommandScorer `{self.name}`: output line {n}"
      try:
        value = json.loads(line)
      except json.JSONDecodeError as e:
        raise ScorerError(f"{where}: malformed JSON at column {e.colno}: {e.msg}: {line[:200]!r}") from None
      reason = ""
      if isinstance(value, dict):
        if "score" not in value:
          raise ScorerError(
              f"{where}: missing field 'score'; expected a number or {{\"score\": number, \"reason\": str}}")
        value, reason = value["score"], value.get("reason", "")
        if not isinstance(reason, str):
          raise ScorerError(f"{where}: field 'reason' must be a string, got {type(reason).__name__}")
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ScorerError(f"{where}: field 'score' must be a finite number, got {value!r}")
      scores.append(Score(float(value), reason))
    return scores
