"""One dream round: walk → scenario → generate at a temperature sweep → score → pair → append.

`dream_round` is what the launcher calls between training cycles. Each scenario is answered by the
current model several times per temperature (defaults 0.1: the model's default behaviour, 0.8:
exploration); the scorer grades every answer; the preferred response is the best-scoring answer
(or the template's target) and the rejected one the model's own worst answer (on-policy). A pair
is kept only when the score margin clears `min_margin`. Kept pairs are appended to a JSONL file in
TRL format (`prompt`/`chosen`/`rejected`) with an `id`, a `kind` and their provenance (template,
node ids, walks, seed, temperatures, scores, model step).

The triplets file is append-only: existing lines are never rewritten. A round is identified by its
seed: re-running it (after a crash) redraws the same scenarios and skips those whose id is
already written; node sets written by other rounds are never drawn again. A last line cut short
by a crash (no newline, not valid JSON) is reported, moved to `<file>.torn` and cut off, so every
line of the file stays a valid triplet.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from dreamjax.data.jsonl import DataError, parse_preference
from dreamjax.dream.memory import MemoryGraph
from dreamjax.dream.recall import Recall
from dreamjax.dream.scenario import Message, Scenario, Template, encode, prompt_text, render, render_chatml
from dreamjax.dream.scorer import Score, score_all
from dreamjax.dream.walk import NoNewWalk, WalkConfig, Walker, coverage
from dreamjax.model.sample import generate, left_pad

log = logging.getLogger("dreamjax.dream")


@dataclasses.dataclass(frozen=True)
class DreamConfig:
  """Everything a dream round needs besides the model, the data and the scorer."""

  walk: WalkConfig = WalkConfig()  # how scenarios' walks are drawn
  temperatures: tuple[float, ...] = (0.1, 0.8)  # the sweep: default behaviour, exploration
  samples_per_temperature: int = 2  # answers per scenario at each temperature
  max_new_tokens: int = 64  # longest answer
  top_p: float = 1.0  # nucleus sampling mass
  batch_size: int = 16  # generation rows per call (fixed, so one compilation per prompt bucket)
  prompt_bucket: int = 64  # prompts are left-padded to a multiple of this
  max_prompt_tokens: int = 1024  # longer prompts keep their last tokens (counted in the stats)
  min_margin: float = 1.0  # keep a pair when score(chosen) - score(rejected) >= this
  kind_shares: Optional[Mapping[str, float]] = None  # target share of scenarios per kind; default equal
  min_kind_share: float = 0.25  # warn when a kind's share of the kept pairs falls below this
  recall_k: int = 3  # memories retrieved into a template's {recalled} placeholder

  def __post_init__(self):
    if not self.temperatures or any(t < 0 for t in self.temperatures):
      raise ValueError(f"DreamConfig.temperatures must be non-empty and >= 0, got {self.temperatures}")
    if self.samples_per_temperature < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
      raise ValueError("DreamConfig: samples_per_temperature, batch_size and max_new_tokens must be >= 1")
    if len(self.temperatures) * self.samples_per_temperature < 2:
      raise ValueError("DreamConfig: a pair needs at least 2 answers per scenario "
                       "(len(temperatures) * samples_per_temperature >= 2)")
    if not 0.0 <= self.min_kind_share <= 1.0:
      raise ValueError(f"DreamConfig.min_kind_share must be in [0, 1], got {self.min_kind_share}")


class Response(NamedTuple):
  """One answer of the model to a scenario, with its score."""

  text: str
  temperature: Optional[float]  # None for a provided target
  score: Score


class Pair(NamedTuple):
  """A kept (or candidate) preference pair."""

  scenario: Scenario
  chosen: Response
  rejected: Response
  all_scores: tuple[tuple[Optional[float], float], ...]  # (temperature, score) of every answer

  @property
  def margin(self) -> float:
    return self.chosen.score.value - self.rejected.score.value


# --------------------------------------------------------------------------------------------------
# Pairing and the kind balance


def make_pair(scenario: Scenario, responses: Sequence[Response], target: Optional[Response] = None) -> Optional[Pair]:
  """Returns the (best or target, worst) pair of a scenario's answers, or None if there is none.

  Blank answers are left out (a response needs a token). Without a target the rejected answer
  must differ in text from the chosen one. Ties go to the earlier answer.
  """
  usable = [r for r in responses if r.text.strip()]
  all_scores = tuple((r.temperature, r.score.value) for r in responses)
  if target is not None:
    chosen = target
    rivals = [r for r in usable if r.text.strip() != target.text.strip()]
  else:
    if not usable:
      return None
    chosen = max(usable, key=lambda r: r.score.value)
    rivals = [r for r in usable if r.text != chosen.text]
  if not rivals:
    return None
  rejected = min(rivals, key=lambda r: r.score.value)
  return Pair(scenario, chosen, rejected, all_scores)


def kind_share_warnings(counts: Mapping[str, int], kinds: Sequence[str], min_share: float, what: str) -> list[str]:
  """Returns (and logs) a warning for each kind whose share of `counts` is below min_share.

  A one-sided set (say, only "accept" pairs) trains sycophancy; this is the guard.
  """
  total = sum(counts.get(k, 0) for k in kinds)
  warnings = []
  if total == 0:
    warnings.append(f"{what}: none, so no kind is represented (kinds {list(kinds)})")
  else:
    for k in kinds:
      share = counts.get(k, 0) / total
      if share < min_share:
        warnings.append(f"{what}: kind {k!r} has {counts.get(k, 0)} of {total} ({share:.0%}), below the "
                        f"minimum share {min_share:.0%}; a one-sided set trains one behaviour only")
  for w in warnings:
    log.warning(w)
  return warnings


def next_kind(kinds: Sequence[str], shares: Sequence[float], counts: Mapping[str, int]) -> str:
  """Returns the kind furthest below its target share (deterministic; ties go to the first)."""
  n = sum(counts.get(k, 0) for k in kinds) + 1
  deficits = [s * n - counts.get(k, 0) for k, s in zip(kinds, shares)]
  return kinds[int(np.argmax(deficits))]


# --------------------------------------------------------------------------------------------------
# The triplets file


class TripletWriter:
  """Appends triplets to a JSONL file; reads what is already there first (see module docstring).

  Attributes after opening: `ids` (scenario ids written), `node_sets` (frozenset of memory ids ->
  seed of the round that wrote it), `kind_counts`, `lines` (valid lines), `torn` (bytes moved to
  `<path>.torn`, 0 if none).
  """

  def __init__(self, path: str, repair_torn: bool = True):
    self.path, self.torn_path = path, path + ".torn"
    self.ids: set[str] = set()
    self.node_sets: dict[frozenset[str], Any] = {}
    self.kind_counts: collections.Counter = collections.Counter()
    self.node_ids: set[str] = set()
    self.lines, self.torn = 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
      self._read_existing(repair_torn)
    self._f = open(path, "a", encoding="utf-8")

  def _read_existing(self, repair_torn: bool) -> None:
    with open(self.path, "rb") as f:
      data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else the last line without one
    for lineno, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      where = f"{self.path}:{lineno}"
      try:
        obj = json.loads(line.decode("utf-8"))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: malformed JSON ({e}); the triplets file is append-only, fix or move it") from None
      self._record(obj, where)
    if not tail.strip():
      return
    where = f"{self.path}:{len(lines) + 1}"
    try:
      obj = json.loads(tail.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
      obj = None
    if obj is not None:  # a whole record that lost only its newline: keep it, end the line
      self._record(obj, where)
      with open(self.path, "ab") as f:
        f.write(b"\n")
      log.warning(f"{where}: last line had no newline; added one")
      return
    if not repair_torn:
      raise DataError(f"{where}: truncated last line ({len(tail)} bytes, no newline): an interrupted write")
    with open(self.torn_path, "ab") as f:
      f.write(tail + b"\n")
    with open(self.path, "r+b") as f:
      f.truncate(len(data) - len(tail))
    self.torn = len(tail)
    log.warning(f"{where}: truncated last line ({len(tail)} bytes) from an interrupted write; moved to "
                f"{self.torn_path}; its scenario will be dreamt again")

  def _record(self, obj: Any, where: str) -> None:
    parse_preference(obj, where)
    if not isinstance(obj.get("id"), str) or not obj["id"]:
      raise DataError(f"{where}: missing field 'id' (a scenario id); not a dream triplets file?")
    if obj["id"] in self.ids:
      raise DataError(f"{where}: field 'id' {obj['id']!r} is already on an earlier line")
    self.ids.add(obj["id"])
    self.kind_counts[obj.get("kind", "")] += 1
    prov = obj.get("provenance") or {}
    node_ids = prov.get("node_ids")
    if isinstance(node_ids, list):
      self.node_sets[frozenset(node_ids)] = prov.get("seed")
      self.node_ids.update(node_ids)
    self.lines += 1

  def append(self, record: dict) -> bool:
    """Appends one triplet (one write, flushed); returns False (and writes nothing) if its id is there."""
    if record["id"] in self.ids:
      return False
    parse_preference(record, f"{self.path} (new record {record['id']})")
    self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._f.flush()
    self.ids.add(record["id"])
    self.kind_counts[record.get("kind", "")] += 1
    node_ids = record.get("provenance", {}).get("node_ids", [])
    self.node_sets[frozenset(node_ids)] = record.get("provenance", {}).get("seed")
    self.node_ids.update(node_ids)
    self.lines += 1
    return True

  def close(self) -> None:
    if not self._f.closed:
      self._f.flush()
      os.fsync(self._f.fileno())
      self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def triplet_record(pair: Pair, *, seed: int, index: int, model_step: int) -> dict:
  """Returns the JSONL record of a pair: TRL fields, id, kind and provenance."""
  sc = pair.scenario
  chat = not isinstance(sc.prompt, str)
  as_turns = (lambda t: [{"role": "assistant", "content": t}]) if chat else (lambda t: t)
  return {
      "prompt": sc.prompt,
      "chosen": as_turns(pair.chosen.text),
      "rejected": as_turns(pair.rejected.text),
      "id": sc.id,
      "kind": sc.kind,
      "provenance": {
          "template": sc.template_id,
          "node_ids": list(sc.node_ids),
          "walks": [list(w) for w in sc.walks],
          "seed": seed,
          "scenario_index": index,
          "model_step": model_step,
          "chosen_is_target": pair.chosen.temperature is None,
          "temperatures": {"chosen": pair.chosen.temperature, "rejected": pair.rejected.temperature},
          "scores": {"chosen": pair.chosen.score.value, "rejected": pair.rejected.score.value,
                     "margin": pair.margin, "all": [list(ts) for ts in pair.all_scores]},
          "reasons": {"chosen": pair.chosen.score.reason, "rejected": pair.rejected.score.reason},
      },
  }


# --------------------------------------------------------------------------------------------------
# Generation


def sample_answers(params, config, tokenizer, prompts: Sequence[Any], dream: DreamConfig, key: jax.Array, *,
                   chat_format: Callable[[Sequence[Message]], str] = render_chatml,
                   stop_tokens: Optional[Sequence[int]] = None) -> tuple[list[list[tuple[float, str]]], int]:
  """Returns ([(temperature, text) per answer] per prompt, number of prompts truncated).

  Every prompt is answered samples_per_temperature times at each temperature; rows of all
  prompts and temperatures share fixed-size batches of the jitted `generate`.
  """
  stops = tuple(config.eos_token_ids if stop_tokens is None else stop_tokens)
  pad_id = 0 if config.pad_token_id is None else config.pad_token_id
  ids, truncated = [], 0
  for p in prompts:
    toks = encode(tokenizer, prompt_text(p, chat_format))
    if not toks:
      raise ValueError(f"a prompt encodes to no tokens: {prompt_text(p, chat_format)[:80]!r}")
    if len(toks) > dream.max_prompt_tokens:
      truncated += 1
      toks = toks[-dream.max_prompt_tokens:]
    ids.append(toks)
  rows = [(i, t) for i in range(len(ids)) for t in dream.temperatures for _ in range(dream.samples_per_temperature)]
  width = -(-max(len(t) for t in ids) // dream.prompt_bucket) * dream.prompt_bucket
  answers: list[list[tuple[float, str]]] = [[] for _ in ids]
  for chunk_no, at in enumerate(range(0, len(rows), dream.batch_size)):
    chunk = rows[at:at + dream.batch_size]
    padded = chunk + [chunk[-1]] * (dream.batch_size - len(chunk))  # fixed batch: one compilation
    toks_BxP, mask_BxP = left_pad([ids[i] for i, _ in padded], pad_id, length=width)
    gen = generate(params, config, (toks_BxP, mask_BxP), dream.max_new_tokens,
                   temperature=[t for _, t in padded], top_p=dream.top_p, key=jax.random.fold_in(key, chunk_no),
                   stop_tokens=stops or None, pad_id=pad_id)
    tokens_BxN, lengths_B = np.asarray(gen.tokens_BxN), np.asarray(gen.lengths_B)
    for r, (i, t) in enumerate(chunk):
      out = tokens_BxN[r, :lengths_B[r]].tolist()
      if out and out[-1] in stops:
        out = out[:-1]
      answers[i].append((t, tokenizer.decode(out) if out else ""))
  return answers, truncated


# --------------------------------------------------------------------------------------------------
# The round


@dataclasses.dataclass
class DreamStats:
  """What one round did (all counts are of this round unless named run_*)."""

  out_path: str
  seed: int
  model_step: int
  scenarios: int = 0  # drawn (including those already written)
  scenarios_per_kind: dict = dataclasses.field(default_factory=dict)
  skipped_existing: int = 0  # already in the file (a resumed round)
  answers: int = 0  # model answers generated
  prompts_truncated: int = 0
  kept: int = 0
  kept_per_kind: dict = dataclasses.field(default_factory=dict)
  dropped_margin: int = 0  # a pair existed but its margin was below min_margin
  dropped_no_pair: int = 0  # fewer than two distinct, non-blank answers
  mean_margin: float = 0.0  # over kept pairs
  coverage: dict = dataclasses.field(default_factory=dict)  # this round's walks
  run_coverage: dict = dataclasses.field(default_factory=dict)  # memories in the whole triplets file
  run_kept_per_kind: dict = dataclasses.field(default_factory=dict)  # the whole triplets file
  torn_bytes: int = 0  # a truncated last line found on opening (moved aside)
  exhausted: bool = False  # the walker found no new node set before n_scenarios
  warnings: list = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def plan_scenarios(walker: Walker, templates: Sequence[Template], n_scenarios: int,
                   kind_shares: Optional[Mapping[str, float]] = None, recall_k: int = 3) -> tuple[list[Scenario], bool]:
  """Returns (scenarios, exhausted): n_scenarios drawn with kinds balanced to their target shares."""
  kinds = list(dict.fromkeys(t.kind for t in templates))
  for t in templates:
    if t.walks_needed > walker.config.n_walks:
      raise ValueError(f"template {t.id!r} ({t.source}) uses {{walk_{t.walks_needed}}} but WalkConfig.n_walks is "
                       f"{walker.config.n_walks}")
  if kind_shares is None:
    shares = [1.0 / len(kinds)] * len(kinds)
  else:
    unknown = sorted(set(kind_shares) - set(kinds))
    if unknown:
      raise ValueError(f"kind_shares names kind {unknown[0]!r}, which no template has (kinds {kinds})")
    total = sum(kind_shares.get(k, 0.0) for k in kinds)
    if total <= 0 or any(v < 0 for v in kind_shares.values()):
      raise ValueError(f"kind_shares must be >= 0 and not all 0, got {dict(kind_shares)}")
    shares = [kind_shares.get(k, 0.0) / total for k in kinds]
  by_kind = {k: [t for t in templates if t.kind == k] for k in kinds}
  counts: collections.Counter = collections.Counter()
  recall = Recall(walker.graph) if any(t.uses_recall for t in templates) else None
  out = []
  for _ in range(n_scenarios):
    kind = next_kind(kinds, shares, counts)
    template = by_kind[kind][int(walker.rng.integers(len(by_kind[kind])))]
    try:
      collision = walker.draw()
    except NoNewWalk as e:
      log.warning(f"dream: stopped after {len(out)} of {n_scenarios} scenarios: {e}")
      return out, True
    out.append(render(template, walker.graph, collision, recall=recall, recall_k=recall_k))
    counts[kind] += 1
  return out, False


def dream_round(
    params,
    config,
    tokenizer,
    graph: MemoryGraph,
    templates: Sequence[Template],
    scorer,
    *,
    n_scenarios: int,
    seed: int,
    out_path: str,
    model_step: int,
    dream: DreamConfig = DreamConfig(),
    chat_format: Callable[[Sequence[Message]], str] = render_chatml,
    stop_tokens: Optional[Sequence[int]] = None,
    seed_weights: Optional[np.ndarray] = None,
    exclude_node_sets: Iterable[frozenset] = (),
) -> DreamStats:
  """Dreams n_scenarios scenarios and appends the kept pairs to out_path; returns the round's stats.

  Args:
    params, config: the current model (`dreamjax.model`), which answers the scenarios.
    tokenizer: has encode(text) -> ids (or an object with .ids) and decode(ids) -> text.
    graph, templates, scorer: the memories, the prompt templates, the training-signal agent.
    n_scenarios: scenarios to draw (fewer if the walker runs out of new node sets).
    seed: the round's seed (walks and sampling); re-running a seed resumes that round.
    out_path: the append-only triplets file (created if missing).
    model_step: the training step of `params`, recorded in the provenance.
    dream: sampling, pairing and walk settings.
    chat_format: renders a chat prompt to text for the model (default ChatML).
    stop_tokens: default: config.eos_token_ids.
    seed_weights: per-memory weights for walk seeds (a consolidation schedule's hook).
    exclude_node_sets: node sets (frozensets of memory ids) never to dream on, e.g. held-out scenarios'.
  """
  start = time.time()
  if not templates:
    raise ValueError("dream_round: no templates")
  stats = DreamStats(out_path=out_path, seed=seed, model_step=model_step)
  with TripletWriter(out_path) as writer:
    stats.torn_bytes = writer.torn
    seen = {ns for ns, s in writer.node_sets.items() if s != seed}  # other rounds' node sets
    seen |= set(exclude_node_sets)
    walker = Walker(graph, dream.walk, np.random.default_rng(seed), seen=seen, seed_weights=seed_weights)
    scenarios, stats.exhausted = plan_scenarios(walker, templates, n_scenarios, dream.kind_shares,
                                                  dream.recall_k)
    stats.scenarios = len(scenarios)
    stats.scenarios_per_kind = dict(collections.Counter(s.kind for s in scenarios))
    stats.coverage = walker.coverage().as_dict()
    todo = [(i, s) for i, s in enumerate(scenarios) if s.id not in writer.ids]
    stats.skipped_existing = len(scenarios) - len(todo)
    kept_per_kind: collections.Counter = collections.Counter()
    margins = []
    per_call = max(1, dream.batch_size // (len(dream.temperatures) * dream.samples_per_temperature))
    key = jax.random.PRNGKey(seed)
    for at in range(0, len(todo), per_call):
      chunk = todo[at:at + per_call]
      answers, truncated = sample_answers(params, config, tokenizer, [s.prompt for _, s in chunk], dream,
                                          jax.random.fold_in(key, chunk[0][0]), chat_format=chat_format,
                                          stop_tokens=stop_tokens)
      stats.prompts_truncated += truncated
      items = [(s, text) for (_, s), ans in zip(chunk, answers) for _, text in ans]
      items += [(s, s.target) for _, s in chunk if s.target is not None]
      scores = iter(score_all(scorer, items))
      responses = [[Response(text, t, next(scores)) for t, text in ans] for ans in answers]
      targets = [Response(s.target, None, next(scores)) if s.target is not None else None for _, s in chunk]
      for (index, scenario), resp, target in zip(chunk, responses, targets):
        stats.answers += len(resp)
        pair = make_pair(scenario, resp, target)
        if pair is None:
          stats.dropped_no_pair += 1
        elif pair.margin < dream.min_margin:
          stats.dropped_margin += 1
        elif writer.append(triplet_record(pair, seed=seed, index=index, model_step=model_step)):
          kept_per_kind[scenario.kind] += 1
          margins.append(pair.margin)
    stats.kept = sum(kept_per_kind.values())
    stats.kept_per_kind = dict(kept_per_kind)
    stats.mean_margin = float(np.mean(margins)) if margins else 0.0
    stats.run_kept_per_kind = dict(writer.kind_counts)
    stats.run_coverage = coverage(graph, [graph.index(i) for i in writer.node_ids if i in graph]).as_dict()
  kinds = list(dict.fromkeys(t.kind for t in templates))
  if todo:  # a round that only skipped written scenarios has nothing new to judge
    stats.warnings = kind_share_warnings(kept_per_kind, kinds, dream.min_kind_share,
                                         f"dream round seed={seed}: kept pairs")
  stats.seconds = time.time() - start
  return stats
