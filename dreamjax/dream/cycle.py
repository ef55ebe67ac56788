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
import json
import os
import time
from typing import Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.data import builtin, jsonl
from dreamjax.data import tokenize as tok_lib
from dreamjax.dream import consolidate as consolidate_lib
from dreamjax.dream import loop as dream_lib
from dreamjax.dream import memory as memory_lib
from dreamjax.dream import scenario as scenario_lib
from dreamjax.dream import scorer as scorer_lib
from dreamjax.dream import walk as walk_lib
from dreamjax.train import batch as batch_lib
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import log as log_lib
from dreamjax.train import loop as train_loop
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import monitor as mon
from dreamjax.train import step as step_lib

RunError = train_loop.RunError
TRIPLETS = os.path.join("triplets", "dream.jsonl")


def _asset(name: str) -> str:
  from dreamjax import dream  # pylint: disable=g-import-not-at-top  (the package imports this module)

  return dream.asset_path(name)


@dataclasses.dataclass
class CycleConfig:
  """Every setting of a dream-cycle run (the absl flags of launch/dream.py, one to one)."""

  model: str = "qwen3-tiny"  # a local HF folder, or a tiny preset (random init, built-in tokenizer)
  run_dir: str = "runs/dream"
  cycles: int = 3
  scenarios: int = 24  # scenarios dreamt per cycle
  seed: int = 0  # cycle k dreams with seed + k
  # Dream inputs ('' : the examples shipped in dreamjax/assets/dream/).
  memories: str = ""
  templates: str = ""  # default: the shipped templates with provided targets
  rules: str = ""
  scorer: str = ""  # 'rules' | 'judge' (model judge) | 'command'; '': 'command' if scorer_command else 'rules'
  scorer_command: str = ""  # an external grader (JSON lines in/out)
  judge: str = "base"  # the model judge's params: 'base' (frozen) or 'current' (self-judgement, updated per cycle)
  judge_template: str = ""  # judgement prompt with {prompt} {response} {kind}; '' : scorer.DEFAULT_JUDGE
  # Dream settings.
  temperatures: tuple[float, ...] = (0.1, 0.8)
  samples_per_temperature: int = 2
  max_new_tokens: int = 96  # the shipped targets are up to 89 tokens of the built-in tokenizer
  top_p: float = 1.0
  gen_batch_size: int = 16
  max_prompt_tokens: int = 1024  # the shipped scenarios are 530–1004 tokens
  min_margin: float = 1.0
  min_kind_share: float = 0.25
  walk_length: int = 4
  n_walks: int = 2
  min_distance: int = 3
  # Two-stage memory: the fast stage reloads the memory file every cycle (new experiences enter at
  # once; templates' {recalled} gets the recall_k most relevant memories); the slow stage replays
  # memories by the consolidation schedule (dreamjax.dream.consolidate).
  recall_k: int = 3
  replay_cycles: int = 3  # cycles a new memory is favoured as a walk seed; 0: uniform seeds
  replay_decay: float = 0.5  # per-cycle decay of a fresh memory's seed weight
  fresh_share: float = 0.75  # share of walk seeds on fresh memories; the rest replays older ones
  eval_scenarios: int = 8  # held-out scenarios (node sets never dreamt) scored by the monitor; 0: none
  # Training (see launch/train.py for the meaning of each).
  general_data: tuple[str, ...] = ()  # general replay JSONL; empty: the built-in general text
  general_ratio: float = 0.25
  objective: str = "orpo"
  beta: float = 0.1
  gradient_mode: str = "frozen"
  optimizer: str = "apollo"
  rank: int = 256
  update_proj_gap: int = 200
  lr: Optional[float] = None  # None: 1e-5 for a model folder, train.loop.PRESET_LR for a preset
  batch_size: int = 8
  steps_per_cycle: int = 0  # 0: one pass over the cycle's triplets; N: at most N steps
  max_context_len: int = 1024
  max_response_len: int = 128  # a dreamt answer (max_new_tokens) plus the end-of-turn tokens
  mesh: str = "-1,1"
  keep: int = 5
  eval_examples: int = 8  # general examples held out for the monitors
  resume: bool = True
  # Guards (None switches one off; drift and residual growth are off for a preset's random init).
  max_perplexity_ratio: Optional[float] = 1.5
  max_weight_drift: Optional[float] = None
  max_residual_growth_vs_base: Optional[float] = None

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


# Settings that must match on resume: they shape the state, the scenarios or the batches.
RESUME_KEYS = ("model_config", "seed", "scenarios", "memories", "templates", "rules", "scorer", "scorer_command",
               "judge", "judge_template", "recall_k", "replay_cycles", "replay_decay", "fresh_share", "eval_scenarios",
               "temperatures", "samples_per_temperature", "max_new_tokens", "max_prompt_tokens", "min_margin",
               "walk_length", "n_walks", "min_distance", "general_data", "general_ratio", "objective",
               "gradient_mode", "optimizer", "rank", "batch_size", "max_context_len", "max_response_len",
               "eval_examples")


def train_config(cfg: CycleConfig) -> train_loop.RunConfig:
  """Returns the train.loop RunConfig of the training part (for its validation and optimizer)."""
  return train_loop.RunConfig(
      model=cfg.model, general_data=cfg.general_data, general_ratio=cfg.general_ratio, objective=cfg.objective,
      beta=cfg.beta, gradient_mode=cfg.gradient_mode, optimizer=cfg.optimizer, rank=cfg.rank,
      update_proj_gap=cfg.update_proj_gap, lr=cfg.lr, batch_size=cfg.batch_size,
      max_context_len=cfg.max_context_len, max_response_len=cfg.max_response_len, mesh=cfg.mesh,
      run_dir=cfg.run_dir, resume=cfg.resume, keep=cfg.keep, eval_examples=cfg.eval_examples, seed=cfg.seed)


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
  if cfg.judge not in ("base", "current"):
    raise RunError(f"--judge: {cfg.judge!r}; expected 'base' or 'current'")
  if cfg.judge_template:
    try:
      cfg.judge_template.format(prompt="", response="", kind="")
    except (KeyError, IndexError, ValueError) as e:
      raise RunError(f"--judge_template: only {{prompt}}, {{response}} and {{kind}} may appear ({e!r})") from None
  for name in ("memories", "templates", "rules"):
    path = getattr(cfg, name)
    if path and not os.path.isfile(path):
      raise RunError(f"--{name}: {path!r} is not a file")
  train_loop.validate(train_config(cfg))
  if cfg.batch_size - int(round(cfg.batch_size * cfg.general_ratio)) < 1:
    raise RunError(f"--batch_size {cfg.batch_size} × --general_ratio {cfg.general_ratio} leaves no room for triplets")


# ---------------------------------------------------------------------------------------------
# Inputs.


SCORERS = ("rules", "judge", "command")


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
    for where, obj in memory_lib.read_objects(path):
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
    scenarios, _ = dream_lib.plan_scenarios(walker, with_targets, cfg.eval_scenarios, recall_k=cfg.recall_k)
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
  idx = np.random.default_rng([cfg.seed, 7]).permutation(len(tg))
  return [tg[i] for i in sorted(idx[cfg.eval_examples:])], [tg[i] for i in idx[:cfg.eval_examples]]


def read_cycle_triplets(path: str, seed: int) -> list[jsonl.PreferenceExample]:
  """Returns the triplets of the round with `seed` (provenance.seed) in the triplets file, in file order."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise jsonl.DataError(f"{where}: malformed JSON ({e})") from None
      if (obj.get("provenance") or {}).get("seed") == seed:
        out.append(jsonl.parse_preference(obj, where))
  return out


def take_general(general, n: int, position: dict, seed: int) -> list:
  """Returns the next n general examples (seeded order, reshuffled per pass) and advances position."""
  out, g_cycle, g_index = [], position["general_cycle"], position["general_index"]
  while len(out) < n:
    order = np.random.default_rng([seed, 1, g_cycle]).permutation(len(general))
    take = order[g_index:g_index + n - len(out)]
    out.extend(general[i] for i in take)
    g_index += len(take)
    if g_index >= len(general):
      g_cycle, g_index = g_cycle + 1, 0
  position["general_cycle"], position["general_index"] = g_cycle, g_index
  return out


def cycle_batches(prefs, general, cfg: CycleConfig, cycle: int, position: dict) -> list[list]:
  """Returns the cycle's batches (lists of examples): one pass over prefs in a seeded order, each
  batch with round(batch_size × general_ratio) replay examples; the last partial batch is filled
  with extra replay (no triplet repeats). steps_per_cycle > 0 caps the number of batches."""
  n_general = int(round(cfg.batch_size * cfg.general_ratio))
  n_pref = cfg.batch_size - n_general
  order = np.random.default_rng([cfg.seed, 3, cycle]).permutation(len(prefs))
  batches = []
  for at in range(0, len(prefs), n_pref):
    if cfg.steps_per_cycle and len(batches) >= cfg.steps_per_cycle:
      break
    p = [prefs[i] for i in order[at:at + n_pref]]
    batches.append(p + take_general(general, cfg.batch_size - len(p), position, cfg.seed))
  return batches


# ---------------------------------------------------------------------------------------------
# The run.


_STEP_CACHE: dict = {}


def _train_step(config, tcfg: train_loop.RunConfig, lr: float, total_steps: int, mesh):
  """Returns (optimizer, schedule, jitted step), reused by later runs in the same process with the
  same settings (a resumed run, tests, sims), so the step compiles once per process."""
  key = (config, tcfg.objective, tcfg.beta, tcfg.gradient_mode, tcfg.optimizer, tcfg.rank, tcfg.update_proj_gap,
         tcfg.schedule, tcfg.warmup_steps, tcfg.b1, tcfg.b2, tcfg.weight_decay, tcfg.seed, lr,
         None if tcfg.schedule == "constant" else total_steps, mesh)
  if key not in _STEP_CACHE:
    optimizer, schedule = train_loop.make_optimizer(tcfg, lr, total_steps)
    step_fn = step_lib.make_train_step(config, tcfg.objective, optimizer, tcfg.gradient_mode, mesh=mesh,
                                       objective_kwargs={"beta": tcfg.beta}, skip_nonfinite=True)
    _STEP_CACHE.clear()  # one entry: a process rarely alternates between settings
    _STEP_CACHE[key] = (optimizer, schedule, step_fn)
  return _STEP_CACHE[key]


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


def _host(x) -> float:
  return float(np.asarray(jax.device_get(x)))


def run(cfg: CycleConfig, on_cycle: Optional[Callable[[dict], None]] = None) -> dict:
  """Runs the remaining cycles; returns the summary (also RUN/summary.json). Raises RunError on bad input.

  on_cycle: called with each finished cycle's record (the RUN/cycles.jsonl line).
  """
  validate(cfg)
  tcfg = train_config(cfg)
  train_loop._prepare_run_dir(cfg.run_dir)  # pylint: disable=protected-access
  graph, templates, scorer = load_dream_inputs(cfg)
  config, params, tokenizer, is_preset = train_loop.load_model(tcfg)
  train_loop.check_vocab(config, tokenizer)
  lr = cfg.lr if cfg.lr is not None else (train_loop.PRESET_LR if is_preset else 1e-5)
  general, eval_general = load_general(cfg, tokenizer)
  eval_prefs, held_out_node_sets = held_out_scenarios(graph, templates, cfg)
  c_len, r_len = cfg.max_context_len, cfg.max_response_len  # fixed: one compilation for every cycle
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  max_steps = cfg.cycles * (cfg.steps_per_cycle or -(-cfg.scenarios // max(1, cfg.batch_size - int(
      round(cfg.batch_size * cfg.general_ratio)))))

  mesh_shape = mesh_lib.parse_mesh_flag(cfg.mesh)
  n_mesh = int(np.prod(mesh_shape))
  try:
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[:n_mesh] if -1 not in mesh_shape else None)
  except ValueError as e:
    raise RunError(f"--mesh {cfg.mesh}: {e}") from None
  if cfg.batch_size % mesh.devices.size:
    raise RunError(f"--batch_size {cfg.batch_size} is not divisible by the {mesh.devices.size} devices of "
                   f"--mesh {cfg.mesh}")
  optimizer, schedule, step_fn = _train_step(config, tcfg, lr, max_steps, mesh)
  place = lambda tree: jax.device_put(tree, mesh_lib.tree_shardings(tree, mesh))
  params = place(params)
  state = place(step_lib.init_train_state(jax.tree.map(jnp.copy, params), optimizer, seed=cfg.seed))

  run_config = dict(cfg.to_json(), lr=lr, model_config=config.architecture(), context_len=c_len,
                    response_len=r_len)
  config_path = os.path.join(cfg.run_dir, "config.json")
  if cfg.resume and os.path.exists(config_path):
    with open(config_path) as f:
      try:
        ckpt_lib.check_resume_config(json.load(f), run_config, keys=RESUME_KEYS)
      except ckpt_lib.ResumeConfigError as e:
        raise RunError(f"{config_path}: {e}") from None
  train_loop._write_json_once(config_path, run_config)  # pylint: disable=protected-access

  ckpt = ckpt_lib.Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), keep=cfg.keep, save_every=1)
  guard = mon.Guard(cfg.run_dir, mon.GuardConfig(
      max_perplexity_ratio=cfg.max_perplexity_ratio,
      max_weight_drift=cfg.max_weight_drift if (cfg.max_weight_drift or is_preset) else 0.5,
      max_residual_growth_vs_base=(cfg.max_residual_growth_vs_base if (cfg.max_residual_growth_vs_base or is_preset)
                                   else 2.0),
      max_chosen_logp_fall=None))
  if ckpt.has_base():
    base_params = ckpt.restore_base(params, mesh)
  else:
    ckpt.save_base(params)
    base_params = params
  position = {"cycle": 0, "general_cycle": 0, "general_index": 0}
  if cfg.resume and ckpt.latest_step() is not None:
    state, saved_position, saved_config, step = ckpt.restore(abstract_state=state, mesh=mesh)
    try:
      ckpt_lib.check_resume_config(saved_config, run_config, keys=RESUME_KEYS)
    except ckpt_lib.ResumeConfigError as e:
      raise RunError(f"{cfg.run_dir}: {e}") from None
    position.update({k: int(v) for k, v in saved_position.items() if k in position})
    guard.restore(step)
    if guard.last_passed_step is not None:
      ckpt.mark_good(guard.last_passed_step)
    logging.info("resumed %s at cycle %d (step %d)", cfg.run_dir, position["cycle"], step)
  elif not cfg.resume and ckpt.latest_step() is not None:
    raise RunError(f"--run_dir {cfg.run_dir!r} already holds checkpoints (steps {ckpt.all_steps()}) and "
                   "--noresume was given; choose a new run folder (nothing there is overwritten)")
  start_cycle = position["cycle"]

  collate = lambda exs: batch_lib.collate(exs, c_len, r_len, pad_id=pad_id)
  eval_b = [collate(eval_general[i:i + cfg.batch_size]) for i in range(0, len(eval_general), cfg.batch_size)]
  eval_p = [tok_lib.encode_preference(e, tokenizer, c_len, r_len, "truncate") for e in eval_prefs]
  eval_pb = [collate(eval_p[i:i + cfg.batch_size]) for i in range(0, len(eval_p), cfg.batch_size)]
  monitor = mon.Monitor(base_params, config, eval_b, eval_pb) if start_cycle < cfg.cycles else None
  if scorer is None:  # the model judge
    scorer = scorer_lib.ModelJudgeScorer(base_params if cfg.judge == "base" else state.params, config, tokenizer,
                                         template=cfg.judge_template or scorer_lib.DEFAULT_JUDGE,
                                         chat_format=chat_format_for(tokenizer), max_context=cfg.max_context_len)
  ledger = consolidate_lib.Ledger(os.path.join(cfg.run_dir, "memory_ledger.json"))
  consolidation = consolidate_lib.ConsolidationSchedule(cfg.replay_cycles, cfg.replay_decay, cfg.fresh_share)
  ref = base_params if cfg.objective in ("dpo", "dpop") else None
  dream_cfg = dream_lib.DreamConfig(
      walk=walk_lib.WalkConfig(length=cfg.walk_length, n_walks=cfg.n_walks, min_distance=cfg.min_distance),
      temperatures=tuple(cfg.temperatures), samples_per_temperature=cfg.samples_per_temperature,
      max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p, batch_size=cfg.gen_batch_size,
      max_prompt_tokens=cfg.max_prompt_tokens, min_margin=cfg.min_margin, min_kind_share=cfg.min_kind_share,
      recall_k=cfg.recall_k)
  chat_format = chat_format_for(tokenizer)
  triplets_path = os.path.join(cfg.run_dir, TRIPLETS)
  cycles_path = os.path.join(cfg.run_dir, "cycles.jsonl")

  status, records, figures = "finished", [], {}
  logger = log_lib.Logger(cfg.run_dir, max_steps)
  t_run = time.time()
  with ckpt_lib.PreemptionGuard() as preempt:
    for k in range(start_cycle, cfg.cycles):
      t0 = time.time()
      seed_k = cfg.seed + k
      model_step = int(state.step)
      graph = load_graph(cfg) if k > start_cycle else graph  # the fast stage: the file as it is now
      ages = ledger.observe(graph, k)
      seed_p = consolidation.seed_weights(ages)
      if isinstance(scorer, scorer_lib.ModelJudgeScorer) and cfg.judge == "current":
        scorer.params = state.params
      dstats = dream_lib.dream_round(state.params, config, tokenizer, graph, templates, scorer,
                                     n_scenarios=cfg.scenarios, seed=seed_k, out_path=triplets_path,
                                     model_step=model_step, dream=dream_cfg, chat_format=chat_format,
                                     seed_weights=seed_p, exclude_node_sets=held_out_node_sets)
      t_dream = time.time() - t0
      stats = tok_lib.TokenStats()
      prefs = [tok_lib.encode_preference(e, tokenizer, c_len, r_len, "truncate", stats)
               for e in read_cycle_triplets(triplets_path, seed_k)]
      prefs = [e for e in prefs if e is not None]
      if not prefs:
        logging.warning("cycle %d: no triplets kept (scenarios %d, dropped by margin %d, no pair %d); no training "
                        "this cycle", k, dstats.scenarios, dstats.dropped_margin, dstats.dropped_no_pair)
      losses, aborted = [], None
      for batch_exs in cycle_batches(prefs, general, cfg, k, position):
        ts = time.time()
        out = step_fn(state, collate(batch_exs), ref) if ref is not None else step_fn(state, collate(batch_exs))
        state, metrics = out
        step = int(state.step)
        loss, gnorm = _host(metrics["loss"]), _host(metrics["grad_norm"])
        logger.log(step, metrics, lr=float(schedule(step - 1)), step_time=time.time() - ts,
                   tokens=_host(metrics["tokens"]))
        if not np.isfinite(loss + gnorm):
          d = guard.skip_nonfinite(step, loss, gnorm)
          if d.action == "abort":
            aborted = d
            break
        else:
          losses.append(loss)
      step = int(state.step)
      if aborted is None:
        figures = monitor.figures(state.params)
        logger.log(step, figures, prefix="monitor")
        decision = guard.decide(step, figures)
        if decision.passed:
          ckpt.mark_good(step)
      else:
        decision = aborted
      position["cycle"] = k + 1
      record = {
          "cycle": k, "seed": seed_k, "model_step": model_step, "step": step, "steps": step - model_step,
          "train_triplets": len(prefs), "loss_first": losses[0] if losses else None,
          "loss_last": losses[-1] if losses else None,
          "dream": {key: v for key, v in dstats.as_dict().items() if key != "out_path"},
          "monitor": {key: v for key, v in figures.items() if "/layer_" not in key},
          "consolidation": dict(consolidate_lib.summary(ages, consolidation, seed_p), memories=len(graph)),
          "guard": {"action": decision.action, "passed": decision.passed, "reasons": list(decision.reasons)},
          "tokenization": stats.as_dict(), "seconds": {"dream": round(t_dream, 2),
                                                       "total": round(time.time() - t0, 2)},
      }
      if decision.action == "abort":
        status = train_loop.abort_and_rollback(f"aborted in cycle {k} at step {step}", decision, guard, ckpt,
                                               state, mesh)
        _append_line(cycles_path, dict(record, status=status))
        records.append(record)
        break
      if not ckpt.save(step, state, dict(position), run_config, force=True) and step == ckpt.latest_step():
        logging.warning("cycle %d trained no step: checkpoint step %d stays at cycle %d (a rerun redoes this "
                        "cycle, skipping its written scenarios)", k, step, start_cycle)
      ckpt.wait()  # the cycle's line is written once its checkpoint is on disk
      _append_line(cycles_path, record)
      records.append(record)
      if on_cycle is not None:
        on_cycle(record)
      if preempt.requested:
        status = f"preempted after cycle {k}; saved"
        break
  ckpt.wait()
  ckpt.close()
  logger.close()
  kinds = collections.Counter()
  for r in records:
    kinds.update(r["dream"]["kept_per_kind"])
  summary = {
      "status": status, "cycles_done": position["cycle"], "cycles": cfg.cycles, "start_cycle": start_cycle,
      "step": int(state.step), "seconds": round(time.time() - t_run, 2), "model": cfg.model, "lr": lr,
      "kept": sum(r["dream"]["kept"] for r in records), "kept_per_kind": dict(kinds),
      "per_cycle": [{"cycle": r["cycle"], "scenarios": r["dream"]["scenarios"], "kept": r["dream"]["kept"],
                     "kept_per_kind": r["dream"]["kept_per_kind"], "skipped_existing": r["dream"]["skipped_existing"],
                     "steps": r["steps"], "model_step": r["model_step"], "loss_first": r["loss_first"],
                     "loss_last": r["loss_last"], "perplexity_ratio": r["monitor"].get("perplexity/ratio"),
                     "held_out_margin": _margin(r["monitor"]), "consolidation": r["consolidation"],
                     "coverage": r["dream"]["coverage"].get("node_fraction"), "seconds": r["seconds"]}
                    for r in records],
      "last_monitor": {key: v for key, v in figures.items() if "/layer_" not in key},
      "paths": {"run_dir": os.path.abspath(cfg.run_dir), "triplets": os.path.abspath(triplets_path),
                "checkpoints": os.path.abspath(str(ckpt.directory)), "cycles": os.path.abspath(cycles_path),
                "monitor": os.path.abspath(guard.path), "tensorboard": os.path.join(os.path.abspath(cfg.run_dir), "tb")},
  }
  with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  return summary
