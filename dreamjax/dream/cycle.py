"""The dream cycle: dream with the current model, train a few steps on the fresh triplets, repeat.

`run(CycleConfig(...))` is what `python -m launch.dream` calls. For cycle k = 0 .. cycles − 1:

  1. dream: `dream_round` with seed = seed + k and the CURRENT params (walk → scenarios →
     generate → score → pair) appends the kept triplets to RUN/triplets/dream.jsonl (append-only,
     provenance incl. the model step that answered);
  2. train: one pass over the cycle's triplets (those whose provenance seed is seed + k), each batch
     mixed with ~general_ratio general replay (the replay position carries over between cycles),
     with the project's train step (ORPO, APOLLO, frozen gradient mode by default) continuing ONE
     TrainState (optimizer state included) across cycles; a last partial batch is filled with
     extra replay, so no triplet is repeated and every step has the same shape;
  3. monitor: held-out general perplexity vs the base, weight drift, residual growth → the guard
     (RUN/monitor.jsonl); an abort rolls back to the last checkpoint that passed and stops;
  4. checkpoint (Orbax, RUN/checkpoints/): the train state, with the number of finished cycles and
     the replay position as the data position; one line per cycle in RUN/cycles.jsonl.

Resume is at cycle granularity: a rerun restores the newest checkpoint and continues at the first
unfinished cycle. A cycle killed after (part of) its dream redraws the same scenarios (same seed,
same restored params), skips those already written and trains on all of the cycle's triplets, so
nothing is duplicated or lost.

The run folder:

    RUN/config.json          the cycle config (written at start; kept as first written)
    RUN/triplets/dream.jsonl the dreamt triplets (TRL format + id, kind, provenance)
    RUN/checkpoints/         Orbax steps
    RUN/base_model/          the model before the first cycle (Orbax)
    RUN/cycles.jsonl         one line per finished cycle: dream stats, steps, loss, monitor figures
    RUN/monitor.jsonl        the guard's decisions
    RUN/tb/                  TensorBoard scalars
    RUN/summary.json         final figures and where everything is
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import time
from typing import Callable, Optional

from absl import logging
import jax
import numpy as np

from dreamjax.data import builtin, jsonl, mix
from dreamjax.data import tokenize as tok_lib
from dreamjax.dream import consolidate as consolidate_lib
from dreamjax.dream import round as round_lib
from dreamjax.dream import memory as memory_lib
from dreamjax.dream import scenario as scenario_lib
from dreamjax.dream import scorer as scorer_lib
from dreamjax.dream import walk as walk_lib
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import loop as train_loop
from dreamjax.train import options as options_lib
from dreamjax.train import session as session_lib
from dreamjax.train.options import option

RunError = options_lib.RunError
SCORERS = ("rules", "judge", "command")
TRIPLETS = os.path.join("triplets", "dream.jsonl")


def _asset(name: str) -> str:
  from dreamjax import dream  # pylint: disable=g-import-not-at-top  (the package imports this module)

  return dream.asset_path(name)


@dataclasses.dataclass
class CycleConfig(options_lib.TrainOptions):
  """Every setting of a dream-cycle run: the training session's options (dreamjax.train.options,
  shared with launch.train) and the dream's own (launch/dream.py's flags)."""

  run_dir: str = option("runs/dream", "Run folder: triplets, checkpoints, cycles.jsonl, monitor.jsonl, tb.")
  seed: int = option(0, "Base seed: cycle k dreams with seed + k; also init, order, projections.")
  max_response_len: int = option(128, "Response tokens kept in training (a dreamt answer plus the end-of-turn "
                                 "tokens).")
  keep: int = option(5, "Checkpoints kept (one per cycle; plus the newest that passed the guard).")
  eval_examples: int = option(8, "General examples held out for the monitors.")
  max_chosen_logp_fall: Optional[float] = option(None, "Guard: nats the held-out scenarios' preferred log-prob "
                                                 "may fall (default: off).")
  cycles: int = option(3, "Dream + train cycles (a resumed run continues up to this many).")
  scenarios: int = option(24, "Scenarios dreamt per cycle.")
  steps_per_cycle: int = option(0, "Max train steps per cycle (0: one pass over its triplets).")
  # Dream inputs ('' : the examples shipped in dreamjax/assets/dream/).
  memories: str = option("", "Memory graph JSONL (default: the shipped example).")
  templates: str = option("", "Scenario templates JSONL (default: the shipped examples with targets).")
  rules: str = option("", "Rule scorer JSONL (default: the shipped example rules).")
  scorer: str = option("", "Training-signal agent: rules (--rules) | judge (model judge) | command "
                       "(--scorer_command). Default: command if --scorer_command is set, else rules.",
                       choices=SCORERS)
  scorer_command: str = option("", "External grader command (JSON lines in/out).")
  judge: str = option("base", "Model judge's params: the frozen base or the current model (updated per cycle).",
                      choices=("base", "current"))
  judge_template: str = option("", "Model judge prompt with {prompt} {response} {kind}; it compares log p(' yes') "
                               "and log p(' no'). Default: scorer.DEFAULT_JUDGE.")
  # Dream settings.
  temperatures: tuple[float, ...] = option((0.1, 0.8), "Sampling temperature sweep, comma-separated.")
  samples_per_temperature: int = option(2, "Answers per scenario per temperature.")
  max_new_tokens: int = option(96, "Longest dreamt answer (tokens; the shipped targets are up to 89).")
  top_p: float = option(1.0, "Nucleus sampling mass.")
  gen_batch_size: int = option(16, "Generation rows per call.")
  max_prompt_tokens: int = option(1024, "Dream prompts keep their last N tokens (the shipped scenarios are "
                                  "530-1004).")
  min_margin: float = option(1.0, "Keep a pair when score(chosen) - score(rejected) >= this.")
  min_kind_share: float = option(0.25, "Warn when a kind's share of the kept pairs is below this.")
  walk_length: int = option(4, "Steps per random walk.")
  n_walks: int = option(2, "Walks per scenario (2 or more: a collision).")
  min_distance: int = option(3, "Fewest hops between colliding walks' seeds.")
  # Two-stage memory: the fast stage reloads the memory file every cycle (new experiences enter at
  # once; templates' {recalled} gets the recall_k most relevant memories); the slow stage replays
  # memories by the consolidation schedule (dreamjax.dream.consolidate).
  recall_k: int = option(3, "Fast stage: memories retrieved into a template's {recalled}.")
  replay_cycles: int = option(3, "Slow stage: cycles a new memory is favoured as a walk seed (0: uniform seeds).")
  replay_decay: float = option(0.5, "Slow stage: per-cycle decay of a fresh memory's seed weight.")
  fresh_share: float = option(0.75, "Slow stage: share of walk seeds on fresh memories; the rest replays older "
                              "ones.")
  eval_scenarios: int = option(8, "Held-out scenarios (node sets never dreamt) the monitor scores each cycle "
                               "(0: none).")


# Settings that must match on resume: they shape the state, the scenarios or the batches.
RESUME_KEYS = options_lib.RESUME_OPTIONS + (
    "scenarios", "memories", "templates", "rules", "scorer", "scorer_command", "judge", "judge_template", "recall_k",
    "replay_cycles", "replay_decay", "fresh_share", "eval_scenarios", "temperatures", "samples_per_temperature",
    "max_new_tokens", "max_prompt_tokens", "min_margin", "walk_length", "n_walks", "min_distance", "max_context_len",
    "max_response_len")


def validate(cfg: CycleConfig) -> None:
  """Raises RunError naming the flag of the first bad setting."""
  for name in ("cycles", "scenarios", "samples_per_temperature", "max_new_tokens", "gen_batch_size",
               "max_prompt_tokens", "n_walks", "eval_examples"):
    if getattr(cfg, name) < 1:
      raise RunError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
  for name in ("steps_per_cycle", "walk_length", "min_distance", "recall_k", "replay_cycles", "eval_scenarios"):
    if getattr(cfg, name) < 0:
      raise RunError(f"--{name}: must be >= 0, got {getattr(cfg, name)}")
  if not cfg.temperatures or any(t < 0 for t in cfg.temperatures):
    raise RunError(f"--temperatures: need at least one temperature, each >= 0; got {list(cfg.temperatures)}")
  if len(cfg.temperatures) * cfg.samples_per_temperature < 2:
    raise RunError("--temperatures × --samples_per_temperature: a pair needs at least 2 answers per scenario")
  if not 0.0 < cfg.top_p <= 1.0:
    raise RunError(f"--top_p: must be in (0, 1], got {cfg.top_p}")
  if not 0.0 <= cfg.min_kind_share <= 1.0:
    raise RunError(f"--min_kind_share: must be in [0, 1], got {cfg.min_kind_share}")
  if not 0.0 < cfg.replay_decay <= 1.0:
    raise RunError(f"--replay_decay: must be in (0, 1], got {cfg.replay_decay}")
  if not 0.0 <= cfg.fresh_share <= 1.0:
    raise RunError(f"--fresh_share: must be in [0, 1], got {cfg.fresh_share}")
  if scorer_kind(cfg) not in SCORERS:
    raise RunError(f"--scorer: {cfg.scorer!r}; expected one of {', '.join(SCORERS)}")
  if scorer_kind(cfg) == "command" and not cfg.scorer_command:
    raise RunError("--scorer command needs --scorer_command")
  if cfg.scorer_command and scorer_kind(cfg) != "command":
    raise RunError(f"--scorer_command is set but --scorer is {cfg.scorer!r}; use --scorer command (or leave it empty)")
  if cfg.judge_template:
    try:
      cfg.judge_template.format(prompt="", response="", kind="")
    except (KeyError, IndexError, ValueError) as e:
      raise RunError(f"--judge_template: only {{prompt}}, {{response}} and {{kind}} may appear ({e!r})") from None
  for name in ("memories", "templates", "rules"):
    path = getattr(cfg, name)
    if path and not os.path.isfile(path):
      raise RunError(f"--{name}: {path!r} is not a file")
  options_lib.validate(cfg)
  if cfg.batch_size - int(round(cfg.batch_size * cfg.general_ratio)) < 1:
    raise RunError(f"--batch_size {cfg.batch_size} × --general_ratio {cfg.general_ratio} leaves no room for triplets")


# ---------------------------------------------------------------------------------------------
# Inputs.


def scorer_kind(cfg: CycleConfig) -> str:
  return cfg.scorer or ("command" if cfg.scorer_command else "rules")


def load_graph(cfg: CycleConfig) -> memory_lib.MemoryGraph:
  """Returns the memory graph as the file holds it now (re-read every cycle: the fast stage)."""
  return memory_lib.load_graph(cfg.memories or _asset("memories.jsonl"))


def load_dream_inputs(cfg: CycleConfig):
  """Returns (graph, templates, scorer); bad files raise DataError naming file, line and field.

  The model judge's scorer is None here: it needs the model (see `run`)."""
  graph = load_graph(cfg)
  templates = scenario_lib.read_templates(cfg.templates or _asset("templates_with_targets.jsonl"))
  if not templates:
    raise RunError(f"--templates: {cfg.templates or 'the shipped templates'} holds no template")
  kind = scorer_kind(cfg)
  scorer = None
  if kind == "command":
    scorer = scorer_lib.CommandScorer(cfg.scorer_command)
  elif kind == "rules":
    scorer = scorer_lib.RuleScorer.from_file(cfg.rules or _asset("rules.jsonl"))
  return graph, templates, scorer


EVAL_SCENARIOS = "eval_scenarios.jsonl"


def held_out_scenarios(graph, templates, cfg: CycleConfig) -> tuple[list, set]:
  """Returns (preference examples, node sets): cfg.eval_scenarios held-out scenarios for the monitor.

  Drawn with their own seed at the run's first start and kept in RUN/eval_scenarios.jsonl (a
  resumed run reads them back, so the monitor's figures stay comparable even if the memory file
  grew); their node sets are excluded from every dream round. Each pairs its template's target
  (chosen) with the target of another kind's template (rejected): does the model prefer the right
  behaviour for the situation? Needs targets for at least two kinds; otherwise none.
  """
  path = os.path.join(cfg.run_dir, EVAL_SCENARIOS)
  if os.path.exists(path):
    prefs, node_sets = [], set()
    for where, obj in jsonl.read_objects(path):
      prefs.append(jsonl.parse_preference(obj, where))
      node_sets.add(frozenset(obj.get("node_ids", ())))
    return prefs, node_sets
  with_targets = [t for t in templates if t.target is not None]
  kinds = list(dict.fromkeys(t.kind for t in with_targets))
  if cfg.eval_scenarios == 0 or len(kinds) < 2:
    return [], set()
  walker = walk_lib.Walker(graph, walk_lib.WalkConfig(length=cfg.walk_length, n_walks=cfg.n_walks,
                                                      min_distance=cfg.min_distance),
                           np.random.default_rng([cfg.seed, 11]))
  try:
    scenarios, _ = round_lib.plan_scenarios(walker, with_targets, cfg.eval_scenarios, recall_k=cfg.recall_k)
  except ValueError as e:
    raise RunError(f"--eval_scenarios: {e}") from None
  other_target = {k: next(t.target for t in with_targets if t.kind != k) for k in kinds}
  out = []
  for sc in scenarios:
    chat = isinstance(sc.prompt, list)
    turns = (lambda t: [{"role": "assistant", "content": t}]) if chat else (lambda t: t)
    out.append({"prompt": sc.prompt, "chosen": turns(sc.target), "rejected": turns(other_target[sc.kind]),
                "id": sc.id, "kind": sc.kind, "node_ids": list(sc.node_ids)})
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in out:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return ([jsonl.parse_preference(r, f"{path}:{i}") for i, r in enumerate(out, 1)],
          {frozenset(r["node_ids"]) for r in out})


def load_general(cfg: CycleConfig, tokenizer):
  """Returns (train, held_out) general examples, tokenized; the held-out ones are a seeded choice."""
  texts = []
  for p in cfg.general_data or (builtin.GENERAL,):
    texts += jsonl.read_texts(p)
  tg = [tok_lib.encode_text(e, tokenizer, cfg.max_response_len + 1) for e in texts]
  if len(tg) < 2 * cfg.eval_examples:
    raise RunError(f"--general_data: {len(tg)} examples; need at least 2 × --eval_examples={cfg.eval_examples} "
                   "(half held out for the monitors)")
  held_out, train = mix.hold_out(tg, cfg.eval_examples, np.random.default_rng([cfg.seed, 7]))
  return train, held_out


def read_cycle_triplets(path: str, seed: int) -> list[jsonl.PreferenceExample]:
  """Returns the triplets of the round with `seed` (provenance.seed) in the triplets file, in file order."""
  if not os.path.exists(path):
    return []
  out = []
  for where, obj in jsonl.read_objects(path):
    if not isinstance(obj, dict) or (obj.get("provenance") or {}).get("seed") == seed:
      out.append(jsonl.parse_preference(obj, where))  # a line that is not an object: its DataError
  return out


def cycle_mixer(prefs, general, cfg: CycleConfig, cycle: int, position: dict) -> mix.Mixer:
  """Returns the Mixer of cycle `cycle`: one pass over its triplets in a seeded order, each batch
  with round(batch_size × general_ratio) replay examples, the replay position carried over from
  the previous cycle; the last partial batch is filled with extra replay (no triplet repeats).

  The cycle is the Mixer's epoch (epochs = cycle + 1, starting at epoch `cycle`) over the cycle's
  own triplets, with the preference order drawn from stream 3, so every cycle's order is its own.
  """
  start = mix.MixerPosition(epoch=cycle, general_cycle=position["general_cycle"],
                            general_index=position["general_index"])
  return mix.Mixer(prefs, general, batch_size=cfg.batch_size, general_ratio=cfg.general_ratio, epochs=cycle + 1,
                   seed=cfg.seed, position=start, fill_last=True, pref_stream=3)


def _append_line(path: str, obj: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(obj, default=float) + "\n")


def _margin(figures: dict) -> Optional[float]:
  """Returns logps/chosen − logps/rejected on the held-out scenarios (None without them)."""
  if "logps/chosen" not in figures:
    return None
  return figures["logps/chosen"] - figures["logps/rejected"]


def chat_format_for(tokenizer):
  """Returns how chat prompts become text: the tokenizer's chat template, else ChatML."""
  if tokenizer.chat_template:
    return lambda msgs: tokenizer.render_chat(list(msgs), add_generation_prompt=True, where="dream prompt")
  return scenario_lib.render_chatml


class _Stopped(Exception):
  """Internal: a stop signal arrived during a dream round; the round ends between two chunks."""


class _DreamProgress:
  """The scorer of a dream round, wrapped to report and to stop between chunks.

  `dream_round` generates the answers of a chunk of scenarios, then scores them in one call: each
  call reports the chunk (generation and scoring seconds, scenarios done) through `progress`, and,
  once a stop signal arrived, stops the round before scoring (`_Stopped`; the triplets already
  written stay, and the rerun redoes the round, skipping them).
  """

  def __init__(self, scorer, what: str, n_scenarios: int, progress: Callable[[str], None],
               stop_requested: Callable[[], bool]):
    self.scorer, self.what, self.n_scenarios = scorer, what, n_scenarios
    self.progress, self.stop_requested = progress, stop_requested
    self.scenarios = 0
    self._t_last = time.time()

  def score_batch(self, items):
    if self.stop_requested():
      raise _Stopped()
    t0 = time.time()
    try:
      out = scorer_lib.score_all(self.scorer, items)
    except scorer_lib.ScorerError:
      if self.stop_requested():  # Ctrl-C in a terminal reaches an external grader too (its process group)
        raise _Stopped() from None
      raise
    self.scenarios += len({sc.id for sc, _ in items})
    now = time.time()
    self.progress(f"{self.what}: {self.scenarios}/{self.n_scenarios} scenarios dreamt ({len(items)} responses: "
                  f"generate {t0 - self._t_last:.1f} s, score {now - t0:.1f} s)")
    self._t_last = now
    return out


def _quiet(message: str) -> None:
  del message


def run(cfg: CycleConfig, on_cycle: Optional[Callable[[dict], None]] = None,
        progress: Callable[[str], None] = _quiet) -> dict:
  """Runs the remaining cycles; returns the summary (also RUN/summary.json). Raises RunError on bad input.

  on_cycle: called with each finished cycle's record (the RUN/cycles.jsonl line).
  progress: called with a line about each phase as it starts or goes (loading, each cycle's
    generate/score chunks, training, evaluation); quiet by default (the launcher prints them).

  A run whose cycles are all done returns the summary.json written when it finished (not
  rewritten), marked `nothing_to_do`. SIGTERM or SIGINT (Ctrl-C) during a cycle's dream stops the
  dream between two chunks (the cycle is redone on resume, its written triplets skipped); during
  its training, the cycle completes and is saved. Either way the run returns with status
  "preempted ..."; a signal during the finish lets it complete (`checkpoint.PreemptionGuard`).
  """
  validate(cfg)
  session_lib.prepare_run_dir(cfg.run_dir)
  if jax.process_count() > 1:
    raise RunError(f"launch.dream runs in one process (this is one of {jax.process_count()}): every process would "
                   "write the same triplets file; spread one process over the host's devices with --mesh instead")
  progress("reading the memories, templates and rules…")
  graph, templates, scorer = load_dream_inputs(cfg)
  progress(f"loading {cfg.model}…")
  mesh = session_lib.make_mesh(cfg)
  model = session_lib.load_model(cfg, mesh)
  config, tokenizer = model.config, model.tokenizer
  general, eval_general = load_general(cfg, tokenizer)
  eval_prefs, held_out_node_sets = held_out_scenarios(graph, templates, cfg)
  c_len, r_len = cfg.max_context_len, cfg.max_response_len  # fixed: one compilation for every cycle
  n_pref = cfg.batch_size - int(round(cfg.batch_size * cfg.general_ratio))
  max_steps = cfg.cycles * (cfg.steps_per_cycle or -(-cfg.scenarios // max(1, n_pref)))
  lr = options_lib.learning_rate(cfg, model.is_preset)
  run_config = dict(cfg.to_json(), lr=lr, model_config=config.architecture(), context_len=c_len, response_len=r_len)
  eval_p = [tok_lib.encode_preference(e, tokenizer, c_len, r_len, "truncate") for e in eval_prefs]
  progress(f"setting up {cfg.run_dir}…")
  s = session_lib.Session(cfg, model, run_config=run_config, resume_keys=RESUME_KEYS, total_steps=max_steps,
                          shapes=(c_len, r_len), eval_general=eval_general, eval_preference=eval_p, save_every=1,
                          mesh=mesh)
  position = {"cycle": 0, "general_cycle": 0, "general_index": 0}
  if s.position is not None:
    position.update({k: int(v) for k, v in s.position.items() if k in position})
    logging.info("resumed %s at cycle %d (step %d)", cfg.run_dir, position["cycle"], s.start)
  start_cycle = position["cycle"]
  summary_path = os.path.join(cfg.run_dir, "summary.json")
  if start_cycle >= cfg.cycles:  # finished before: keep its summary
    s.close()
    return _nothing_to_do(s, summary_path, start_cycle)
  if s.position is not None:
    progress(f"resumed {cfg.run_dir} at cycle {start_cycle} of {cfg.cycles} (step {s.start})")

  if scorer is None:  # the model judge
    scorer = scorer_lib.ModelJudgeScorer(s.base_params if cfg.judge == "base" else s.state.params, config, tokenizer,
                                         template=cfg.judge_template or scorer_lib.DEFAULT_JUDGE,
                                         chat_format=chat_format_for(tokenizer), max_context=cfg.max_context_len)
  ledger = consolidate_lib.Ledger(os.path.join(cfg.run_dir, "memory_ledger.json"))
  consolidation = consolidate_lib.ConsolidationSchedule(cfg.replay_cycles, cfg.replay_decay, cfg.fresh_share)
  dream_cfg = round_lib.DreamConfig(
      walk=walk_lib.WalkConfig(length=cfg.walk_length, n_walks=cfg.n_walks, min_distance=cfg.min_distance),
      temperatures=tuple(cfg.temperatures), samples_per_temperature=cfg.samples_per_temperature,
      max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p, batch_size=cfg.gen_batch_size,
      max_prompt_tokens=cfg.max_prompt_tokens, min_margin=cfg.min_margin, min_kind_share=cfg.min_kind_share,
      recall_k=cfg.recall_k)
  chat_format = chat_format_for(tokenizer)
  triplets_path = os.path.join(cfg.run_dir, TRIPLETS)
  cycles_path = os.path.join(cfg.run_dir, "cycles.jsonl")

  status, records = "finished", []
  t_run = time.time()
  compiled = False  # whether this session has run a train step (the first compiles it)
  with ckpt_lib.PreemptionGuard() as preempt:
    for k in range(start_cycle, cfg.cycles):
      t0 = time.time()
      seed_k = cfg.seed + k
      model_step = s.step_count
      graph = load_graph(cfg) if k > start_cycle else graph  # the fast stage: the file as it is now
      ages = ledger.observe(graph, k)
      seed_p = consolidation.seed_weights(ages)
      if isinstance(scorer, scorer_lib.ModelJudgeScorer) and cfg.judge == "current":
        scorer.params = s.state.params
      what = f"cycle {k} (of {cfg.cycles})"
      progress(f"{what}: dreaming {cfg.scenarios} scenarios (generate, score, pair"
               f"{'; the first generation compiles' if k == start_cycle else ''})…")
      try:
        dstats = round_lib.dream_round(
            s.state.params, config, tokenizer, graph, templates,
            _DreamProgress(scorer, what, cfg.scenarios, progress, lambda: preempt.requested),
            n_scenarios=cfg.scenarios, seed=seed_k, out_path=triplets_path, model_step=model_step, dream=dream_cfg,
            chat_format=chat_format, seed_weights=seed_p, exclude_node_sets=held_out_node_sets)
      except _Stopped:
        status = (f"preempted in cycle {k}'s dream ({k} cycle(s) done and saved, step {s.step_count}); a rerun "
                  f"redoes cycle {k}, keeping the triplets it wrote")
        break
      t_dream = time.time() - t0
      stats = tok_lib.TokenStats()
      prefs = [tok_lib.encode_preference(e, tokenizer, c_len, r_len, "truncate", stats)
               for e in read_cycle_triplets(triplets_path, seed_k)]
      prefs = [e for e in prefs if e is not None]
      decision = None
      if prefs:
        n_steps = -(-len(prefs) // n_pref)
        n_steps = min(n_steps, cfg.steps_per_cycle) if cfg.steps_per_cycle else n_steps
        progress(f"{what}: kept {dstats.kept} new pairs {dstats.kept_per_kind}; training on the cycle's {len(prefs)} "
                 f"triplets, {n_steps} step(s){'; the first step compiles' if not compiled else ''}…")
        compiled = True
        mixer = cycle_mixer(prefs, general, cfg, k, position)
        for mb in itertools.islice(mixer, cfg.steps_per_cycle or None):
          decision = s.step(mb.preference + mb.general)
          if decision is not None and decision.action == "abort":
            break
        position["general_cycle"], position["general_index"] = (mixer.position.general_cycle,
                                                                mixer.position.general_index)
      else:
        logging.warning("cycle %d: no triplets kept (scenarios %d, dropped by margin %d, no pair %d); no training "
                        "this cycle", k, dstats.scenarios, dstats.dropped_margin, dstats.dropped_no_pair)
      if decision is None or decision.action != "abort":
        progress(f"{what}: evaluating (held-out perplexity, drift, scenarios)…")
        decision = s.evaluate()
      step = s.step_count
      losses = [loss for st, loss in s.losses if st > model_step]
      position["cycle"] = k + 1
      record = {
          "cycle": k, "seed": seed_k, "model_step": model_step, "step": step, "steps": step - model_step,
          "train_triplets": len(prefs), "loss_first": losses[0] if losses else None,
          "loss_last": losses[-1] if losses else None,
          "dream": {key: v for key, v in dstats.as_dict().items() if key != "out_path"},
          "monitor": {key: v for key, v in s.last_figures.items() if "/layer_" not in key},
          "consolidation": dict(consolidate_lib.summary(ages, consolidation, seed_p), memories=len(graph)),
          "guard": {"action": decision.action, "passed": decision.passed, "reasons": list(decision.reasons)},
          "tokenization": stats.as_dict(), "seconds": {"dream": round(t_dream, 2),
                                                       "total": round(time.time() - t0, 2)},
      }
      if decision.action == "abort":
        status = s.rollback(f"aborted in cycle {k} at step {step}", decision)
        _append_line(cycles_path, dict(record, status=status))
        records.append(record)
        break
      if not s.save(position, force=True) and step == s.ckpt.latest_step():
        logging.warning("cycle %d trained no step: checkpoint step %d stays at cycle %d (a rerun redoes this "
                        "cycle, skipping its written scenarios)", k, step, start_cycle)
      s.wait()  # the cycle's line is written once its checkpoint is on disk
      _append_line(cycles_path, record)
      records.append(record)
      if on_cycle is not None:
        on_cycle(record)
      if preempt.requested and k + 1 < cfg.cycles:
        status = f"preempted after cycle {k}; saved"
        break
    preempt.finishing()  # from here a first signal lets the final save and the summary complete
    s.close()
    kinds = collections.Counter()
    for r in records:
      kinds.update(r["dream"]["kept_per_kind"])
    summary = {
        "status": status, "cycles_done": position["cycle"], "cycles": cfg.cycles, "start_cycle": start_cycle,
        "step": s.step_count, "seconds": round(time.time() - t_run, 2), "model": cfg.model, "lr": lr,
        "kept": sum(r["dream"]["kept"] for r in records), "kept_per_kind": dict(kinds),
        "per_cycle": [{"cycle": r["cycle"], "scenarios": r["dream"]["scenarios"], "kept": r["dream"]["kept"],
                       "kept_per_kind": r["dream"]["kept_per_kind"], "skipped_existing": r["dream"]["skipped_existing"],
                       "steps": r["steps"], "model_step": r["model_step"], "loss_first": r["loss_first"],
                       "loss_last": r["loss_last"], "perplexity_ratio": r["monitor"].get("perplexity/ratio"),
                       "held_out_margin": _margin(r["monitor"]), "consolidation": r["consolidation"],
                       "coverage": r["dream"]["coverage"].get("node_fraction"), "seconds": r["seconds"]}
                      for r in records],
        "last_monitor": {key: v for key, v in s.last_figures.items() if "/layer_" not in key},
        "paths": dict(s.paths(), triplets=os.path.abspath(triplets_path), cycles=os.path.abspath(cycles_path)),
    }
    if records or not os.path.exists(summary_path):  # a session that finished no cycle keeps the old summary
      train_loop.write_summary(summary_path, summary)
  return summary


def _nothing_to_do(s: session_lib.Session, summary_path: str, cycles_done: int) -> dict:
  """Returns the summary of a run whose cycles were all done (not rewritten), marked nothing_to_do."""
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  else:  # finished, but killed before its summary was written
    summary = {"status": "finished", "cycles_done": cycles_done, "step": s.start, "seconds": 0.0, "kept": 0,
               "kept_per_kind": {}, "paths": s.paths()}
  return dict(summary, nothing_to_do=True, cycles_done=cycles_done, step=s.start)
