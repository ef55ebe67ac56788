"""A training run: data in, checkpoints, TensorBoard logs, monitor decisions and a summary out.

`run(RunConfig(...))` is what `python -m launch.train` calls; everything here is importable and
tested. The run folder (design.md):

    RUN/config.json       the run config (written at start; kept as first written)
    RUN/checkpoints/      Orbax steps (train state, data position, run config)
    RUN/base_model/       the base model's params (Orbax), written once: drift, rollback, DPO reference
    RUN/tb/               TensorBoard event files
    RUN/monitor.jsonl     one line per guard decision (append-only)
    RUN/summary.json      final figures and where everything is
    RUN/bad_lines.txt     data lines skipped with --skip_bad_lines

Exact resume: the train state, the mixer position and the step are restored from the newest
readable checkpoint, so a run killed at any step and resumed reaches bitwise the parameters of
the uninterrupted run (CPU). SIGTERM finishes the step, saves and exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamjax import model as M
from dreamjax.model import config as model_config_lib
from dreamjax.model import hf
from dreamjax import optim
from dreamjax.data import builtin, jsonl, mix
from dreamjax.data import tokenize as tok_lib
from dreamjax.train import batch as batch_lib
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import log as log_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import monitor as mon
from dreamjax.train import step as step_lib

OBJECTIVES = ("orpo", "sft", "dpo", "dpop")
OPTIMIZERS = ("apollo", "apollo_mini", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
PRESET_LR = 3e-3  # from-scratch tiny presets: 1e-5 would not move a random init in minutes


class RunError(RuntimeError):
  """A run cannot start or continue; the message says what and where."""


@dataclasses.dataclass
class RunConfig:
  """Every setting of a run (the absl flags of launch/train.py, one to one)."""

  model: str = "qwen3-tiny"  # a local HF folder, or a tiny preset (random init, built-in tokenizer)
  data: tuple[str, ...] = ()  # preference JSONL files; empty: the built-in set
  general_data: tuple[str, ...] = ()  # general-text JSONL files; empty with no --data: built-in
  general_ratio: float = 0.25
  objective: str = "orpo"
  beta: float = 0.1  # ORPO's λ (TRL's beta) or DPO's β
  gradient_mode: str = "frozen"
  optimizer: str = "apollo"
  rank: int = 256  # APOLLO rank (clipped to the smallest projected dimension)
  apollo_scale: Optional[float] = None  # APOLLO / APOLLO-Mini scale (None: their defaults 1 / 128)
  update_proj_gap: int = 200
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  lr: Optional[float] = None  # None: 1e-5 for a model folder, PRESET_LR for a preset
  schedule: str = "constant"
  warmup_steps: int = 0
  batch_size: int = 8
  grad_accum: int = 1
  dropout: float = 0.0  # residual dropout while training (0: off, the usual for LLM fine-tuning)
  max_context_len: int = 1024
  max_response_len: int = 256
  overlong: str = "truncate"  # or 'drop'
  epochs: int = 1
  mesh: str = "-1,1"
  run_dir: str = "runs/default"
  resume: bool = True
  save_every: int = 100
  keep: int = 3
  eval_every: int = 50
  eval_examples: int = 16  # held out of the general (and preference) data for the monitors
  seed: int = 0
  max_steps: int = 0  # 0: one full pass (× epochs)
  remat: bool = False
  remat_policy: str = "full"  # with remat: 'full' keeps only each scanned block's input, 'dots' its projections
  bf16: bool = False  # bf16 compute over float32 master weights
  attention_impl: str = "auto"  # dreamjax.model.attention: 'auto' picks by platform
  prefill_chunk: int = 4096  # frozen contexts are encoded this many tokens at a time (0: at once)
  skip_bad_lines: bool = False
  max_perplexity_ratio: Optional[float] = 1.5
  # Drift guards (None: 0.5 and 2.0 for a model folder; off for a preset, whose base is a random init):
  max_weight_drift: Optional[float] = None
  max_residual_growth_vs_base: Optional[float] = None
  max_chosen_logp_fall: Optional[float] = 1.0
  max_nonfinite_steps: int = 10

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


# Fields that must match on resume: they decide the state's structure or the batches' order.
RESUME_KEYS = ("model_config", "data", "general_data", "general_ratio", "objective", "gradient_mode",
               "optimizer", "rank", "batch_size", "epochs", "seed", "eval_examples")


def _check_choice(value, choices, flag):
  if value not in choices:
    raise RunError(f"--{flag}: {value!r} is not one of {', '.join(choices)}")


def validate(cfg: RunConfig) -> None:
  """Raises RunError naming the flag of the first bad setting."""
  _check_choice(cfg.objective, OBJECTIVES, "objective")
  _check_choice(cfg.gradient_mode, step_lib.GRADIENT_MODES, "gradient_mode")
  _check_choice(cfg.optimizer, OPTIMIZERS, "optimizer")
  _check_choice(cfg.schedule, SCHEDULES, "schedule")
  _check_choice(cfg.overlong, tok_lib.OVERLONG, "overlong")
  _check_choice(cfg.remat_policy, ("full", "dots"), "remat_policy")
  _check_choice(cfg.attention_impl, model_config_lib.ATTENTION_IMPLEMENTATIONS, "attention_impl")
  if cfg.prefill_chunk < 0:
    raise RunError(f"--prefill_chunk: must be >= 0 (0: the whole context at once), got {cfg.prefill_chunk}")
  for name in ("batch_size", "grad_accum", "max_context_len", "max_response_len", "epochs", "save_every",
               "keep", "eval_every", "rank", "update_proj_gap"):
    if getattr(cfg, name) < 1:
      raise RunError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
  if not 0.0 <= cfg.general_ratio < 1.0:
    raise RunError(f"--general_ratio: must be in [0, 1), got {cfg.general_ratio}")
  if cfg.lr is not None and not cfg.lr > 0:
    raise RunError(f"--lr: must be > 0, got {cfg.lr}")
  if not 0.0 <= cfg.dropout < 1.0:
    raise RunError(f"--dropout: must be in [0, 1), got {cfg.dropout}")
  if cfg.batch_size % cfg.grad_accum:
    raise RunError(f"--batch_size {cfg.batch_size} is not divisible by --grad_accum {cfg.grad_accum}")
  if cfg.objective in ("dpo", "dpop") and cfg.general_ratio > 0:
    logging.info("dpo/dpop: general examples get the SFT loss; the reference model is the base model")
  try:
    mesh_lib.parse_mesh_flag(cfg.mesh)
  except ValueError as e:
    raise RunError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data.


def load_model(cfg: RunConfig):
  """Returns (config, params, tokenizer, is_preset)."""
  if cfg.model in model_config_lib.PRESETS:
    config = _run_options(M.ModelConfig.preset(cfg.model), cfg)
    params = M.init_params(config, jax.random.PRNGKey(cfg.seed))
    tokenizer = tok_lib.TextTokenizer.from_folder(builtin.TOKENIZER)
    return config, params, tokenizer, True
  folder = cfg.model
  if not os.path.isdir(folder):
    raise RunError(f"--model: {folder!r} is neither a local model folder nor a preset "
                   f"({', '.join(sorted(model_config_lib.PRESETS))}); models are read from local folders only")
  config, params = hf.load(folder)
  tokenizer = tok_lib.TextTokenizer.from_folder(folder)
  return _run_options(config, cfg), params, tokenizer, False


def _run_options(config: M.ModelConfig, cfg: RunConfig) -> M.ModelConfig:
  """Returns the config with the run's implementation choices (how it runs, not what it computes)."""
  return config.replace(attention_impl=cfg.attention_impl, prefill_chunk=cfg.prefill_chunk)


def check_vocab(config, tokenizer) -> None:
  if tokenizer.vocab_size > config.vocab_size:
    raise RunError(f"tokenizer/model vocab mismatch: {tokenizer.source}/tokenizer.json has {tokenizer.vocab_size} "
                   f"ids but the model's vocab_size is {config.vocab_size}; ids past it have no embedding")


def _read_all(paths, reader, cfg, bad, bad_file):
  out = []
  for p in paths:
    out += reader(p, skip_bad_lines=cfg.skip_bad_lines, bad_lines_file=bad_file, bad=bad)
  return out


def load_data(cfg: RunConfig, tokenizer, run_dir: str):
  """Returns (preference, general, eval_pref, eval_general, stats) as TokenizedExamples."""
  pref_paths = cfg.data or (builtin.PREFERENCES,)
  general_paths = cfg.general_data or ((builtin.GENERAL,) if not cfg.data else ())
  bad, bad_file = jsonl.BadLines(), os.path.join(run_dir, "bad_lines.txt")
  prefs = _read_all(pref_paths, jsonl.read_preferences, cfg, bad, bad_file)
  texts = _read_all(general_paths, jsonl.read_texts, cfg, bad, bad_file)
  stats = tok_lib.TokenStats()
  tp = [tok_lib.encode_preference(e, tokenizer, cfg.max_context_len, cfg.max_response_len, cfg.overlong, stats)
        for e in prefs]
  tp = [e for e in tp if e is not None]
  tg = [tok_lib.encode_text(e, tokenizer, cfg.max_response_len + 1, stats) for e in texts]
  # Held-out examples for the monitors: a seeded choice, never trained on.
  rng = np.random.default_rng([cfg.seed, 7])
  n_eval = cfg.eval_examples
  if len(tp) <= n_eval:
    raise RunError(f"--data: {len(tp)} usable preference examples; need more than --eval_examples={n_eval} "
                   "(which are held out for the monitors)")
  idx = rng.permutation(len(tp))
  eval_pref, tp = [tp[i] for i in idx[:n_eval]], [tp[i] for i in sorted(idx[n_eval:])]
  eval_general = []
  if tg:
    idx = rng.permutation(len(tg))
    k = min(n_eval, len(tg) // 2)
    eval_general, tg = [tg[i] for i in idx[:k]], [tg[i] for i in sorted(idx[k:])]
  return tp, tg, eval_pref, eval_general, stats, bad


def shapes(examples, cfg: RunConfig) -> tuple[int, int]:
  """Returns static (context_len, response_len): the data's longest, capped by the flags."""
  c = max(len(e.context) for e in examples)
  r = max(max(len(e.chosen), len(e.rejected or ())) for e in examples)
  round_up = lambda n, m: -(-n // m) * m
  return min(round_up(c, 8), cfg.max_context_len), min(round_up(r, 8), cfg.max_response_len)


def make_optimizer(cfg: RunConfig, lr: float, total_steps: int):
  """Returns (optimizer, learning-rate schedule)."""
  if cfg.schedule == "constant":
    sched = optax.constant_schedule(lr) if not cfg.warmup_steps else optax.join_schedules(
        [optax.linear_schedule(0.0, lr, cfg.warmup_steps), optax.constant_schedule(lr)], [cfg.warmup_steps])
  else:
    decay = max(total_steps - cfg.warmup_steps, 1)
    tail = (optax.cosine_decay_schedule(lr, decay) if cfg.schedule == "cosine"
            else optax.linear_schedule(lr, 0.0, decay))
    sched = tail if not cfg.warmup_steps else optax.join_schedules(
        [optax.linear_schedule(0.0, lr, cfg.warmup_steps), tail], [cfg.warmup_steps])
  kw = dict(b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, key=cfg.seed)
  if cfg.optimizer == "apollo":
    opt = optim.apollo(sched, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
                       **({"scale": cfg.apollo_scale} if cfg.apollo_scale else {}), **kw)
  elif cfg.optimizer == "apollo_mini":
    opt = optim.apollo_mini(sched, update_proj_gap=cfg.update_proj_gap,
                            **({"scale": cfg.apollo_scale} if cfg.apollo_scale else {}), **kw)
  else:
    opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  return opt, sched


# ---------------------------------------------------------------------------------------------
# The run.


def _prepare_run_dir(run_dir: str) -> None:
  try:
    os.makedirs(run_dir, exist_ok=True)
    probe = os.path.join(run_dir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise RunError(f"--run_dir: {run_dir!r} is not writable: {e.strerror or e}") from None


def _write_json_once(path: str, obj) -> None:
  if not os.path.exists(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def abort_and_rollback(what: str, decision, guard, ckpt, state, mesh) -> str:
  """Rolls the checkpoints back to the newest one that passed the guard; returns the run status."""
  status = f"{what}: {'; '.join(decision.reasons)}"
  target = guard.rollback_step(ckpt.all_steps())
  if target is not None:
    ckpt.rollback(target, abstract_state=state, mesh=mesh)
    status += f"; rolled back to checkpoint step {target}"
  else:
    status += "; no checkpoint passed the guard, nothing to roll back to"
  logging.error(status)
  return status


def _host(x) -> float:
  return float(np.asarray(jax.device_get(x)))


def run(cfg: RunConfig) -> dict:
  """Trains; returns the summary (also written to RUN/summary.json). Raises RunError on bad input."""
  validate(cfg)
  _prepare_run_dir(cfg.run_dir)
  config, params, tokenizer, is_preset = load_model(cfg)
  check_vocab(config, tokenizer)
  lr = cfg.lr if cfg.lr is not None else (PRESET_LR if is_preset else 1e-5)
  prefs, general, eval_pref, eval_general, tstats, bad = load_data(cfg, tokenizer, cfg.run_dir)
  if tstats.context_truncated or tstats.response_truncated or tstats.dropped_overlong:
    logging.warning("over-long examples: %s (--max_context_len %d, --max_response_len %d, --overlong %s)",
                    tstats.as_dict(), cfg.max_context_len, cfg.max_response_len, cfg.overlong)
  if bad.count:
    logging.warning("skipped %d bad data line(s); see %s", bad.count, os.path.join(cfg.run_dir, "bad_lines.txt"))
  c_len, r_len = shapes(prefs + general + eval_pref + eval_general, cfg)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

  mixer = mix.Mixer(prefs, general, batch_size=cfg.batch_size,
                    general_ratio=cfg.general_ratio if general else 0.0, epochs=cfg.epochs, seed=cfg.seed)
  full_batches = mixer.total_batches() - (cfg.epochs if len(prefs) % mixer.n_pref else 0)
  total_steps = min(full_batches, cfg.max_steps) if cfg.max_steps else full_batches
  if total_steps < 1:
    raise RunError(f"--batch_size {cfg.batch_size}: {len(prefs)} training examples make no full batch")
  optimizer, schedule = make_optimizer(cfg, lr, total_steps)

  mesh_shape = mesh_lib.parse_mesh_flag(cfg.mesh)
  n_mesh = int(np.prod(mesh_shape))  # a mesh without -1 may use only the first devices
  try:
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[:n_mesh] if -1 not in mesh_shape else None)
  except ValueError as e:
    raise RunError(f"--mesh {cfg.mesh}: {e}") from None
  n_dev = mesh.devices.size
  if (cfg.batch_size // cfg.grad_accum) % n_dev:
    raise RunError(f"--batch_size {cfg.batch_size} / --grad_accum {cfg.grad_accum} is not divisible by the "
                   f"{n_dev} devices of --mesh {cfg.mesh}")
  place = lambda tree: jax.device_put(tree, mesh_lib.tree_shardings(tree, mesh))
  params = place(params)
  # The step donates its state: the base params (drift, rollback, DPO reference) are a copy.
  state = step_lib.init_train_state(jax.tree.map(jnp.copy, params), optimizer, seed=cfg.seed)
  state = place(state)
  run_config = dict(cfg.to_json(), lr=lr, model_config=config.architecture(), context_len=c_len,
                    response_len=r_len, total_steps=total_steps)
  config_path = os.path.join(cfg.run_dir, "config.json")
  if cfg.resume and os.path.exists(config_path):  # refuse a changed run before touching anything in it
    with open(config_path) as f:
      try:
        ckpt_lib.check_resume_config(json.load(f), run_config, keys=RESUME_KEYS)
      except ckpt_lib.ResumeConfigError as e:
        raise RunError(f"{config_path}: {e}") from None
  _write_json_once(config_path, run_config)

  ckpt = ckpt_lib.Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), keep=cfg.keep, save_every=cfg.save_every)
  guard = mon.Guard(cfg.run_dir, mon.GuardConfig(
      max_perplexity_ratio=cfg.max_perplexity_ratio,
      max_weight_drift=cfg.max_weight_drift if (cfg.max_weight_drift or is_preset) else 0.5,
      max_residual_growth_vs_base=(cfg.max_residual_growth_vs_base if (cfg.max_residual_growth_vs_base or is_preset)
                                   else 2.0),
      max_chosen_logp_fall=cfg.max_chosen_logp_fall, max_nonfinite_steps=cfg.max_nonfinite_steps))
  start = 0
  if ckpt.has_base():
    base_params = ckpt.restore_base(params, mesh)
  else:
    ckpt.save_base(params)
    base_params = params
  if cfg.resume and ckpt.latest_step() is not None:
    state, position, saved_config, start = ckpt.restore(abstract_state=state, mesh=mesh)
    try:
      ckpt_lib.check_resume_config(saved_config, run_config, keys=RESUME_KEYS)
    except ckpt_lib.ResumeConfigError as e:
      raise RunError(f"{cfg.run_dir}: {e}") from None
    mixer.position = mix.MixerPosition.from_dict(position)
    guard.restore(start)
    if guard.last_passed_step is not None:
      ckpt.mark_good(guard.last_passed_step)
    logging.info("resumed %s at step %d", cfg.run_dir, start)
  elif not cfg.resume and ckpt.latest_step() is not None:
    raise RunError(f"--run_dir {cfg.run_dir!r} already holds checkpoints (steps {ckpt.all_steps()}) and "
                   "--noresume was given; choose a new run folder (nothing there is overwritten)")

  collate = lambda exs: batch_lib.collate(exs, c_len, r_len, pad_id=pad_id)
  eval_general_b = [collate(eval_general[i:i + cfg.batch_size]) for i in range(0, len(eval_general), cfg.batch_size)]
  eval_pref_b = [collate(eval_pref[i:i + cfg.batch_size]) for i in range(0, len(eval_pref), cfg.batch_size)]
  if not eval_general_b:  # no general data: perplexity on the held-out chosen responses
    eval_general_b = [collate([batch_lib.TokenizedExample(e.context, e.chosen) for e in eval_pref])]
  monitor = mon.Monitor(base_params, config, eval_general_b, eval_pref_b)
  step_fn = step_lib.make_train_step(
      config, cfg.objective, optimizer, cfg.gradient_mode, mesh=mesh,
      objective_kwargs={"beta": cfg.beta}, remat=cfg.remat_policy if cfg.remat else False, compute_dtype=jnp.bfloat16 if cfg.bf16 else None,
      grad_accum=cfg.grad_accum, skip_nonfinite=True, grad_stats=True, dropout=cfg.dropout)
  ref = base_params if cfg.objective in ("dpo", "dpop") else None

  status, step, last_metrics, figures = "finished", start, {}, {}
  logger = log_lib.Logger(cfg.run_dir, total_steps)
  t_run = time.time()
  with ckpt_lib.PreemptionGuard() as preempt:
    while step < total_steps:
      mb = next(mixer, None)
      if mb is None:
        break
      if len(mb.preference) != mixer.n_pref:  # a short last batch would recompile; skip it, logged
        logging.info("skipping a final partial batch of %d preference examples", len(mb.preference))
        continue
      batch = collate(mb.preference + mb.general)
      t0 = time.time()
      state, metrics = step_fn(state, batch, ref) if ref is not None else step_fn(state, batch)
      step = int(state.step)
      loss, gnorm = _host(metrics["loss"]), _host(metrics["grad_norm"])
      dt = time.time() - t0
      decision = guard.skip_nonfinite(step, loss, gnorm) if not np.isfinite(loss + gnorm) else None
      scalars = {k: v for k, v in metrics.items() if not k.startswith("grad/") or step % cfg.eval_every == 0}
      logger.log(step, scalars, lr=float(schedule(step - 1)), step_time=dt, tokens=_host(metrics["tokens"]))
      logger.progress(step, loss=loss)
      last_metrics = metrics
      if decision is None and (step % cfg.eval_every == 0 or step == total_steps):
        figures = monitor.figures(state.params)
        logger.log(step, figures, prefix="monitor")
        decision = guard.decide(step, figures)
        if decision.passed:
          ckpt.mark_good(step)
      if decision is not None and decision.action == "abort":
        status = abort_and_rollback(f"aborted at step {step}", decision, guard, ckpt, state, mesh)
        break
      ckpt.save(step, state, mixer.position.to_dict(), run_config, force=step == total_steps)
      if preempt.should_stop(step):
        ckpt.save(step, state, mixer.position.to_dict(), run_config, force=True)
        status = f"preempted at step {step}; saved"
        break
  ckpt.wait()
  ckpt.close()
  logger.close()
  summary_path = os.path.join(cfg.run_dir, "summary.json")
  if step == start and os.path.exists(summary_path):  # nothing left to do: keep the run's summary
    with open(summary_path) as f:
      return json.load(f)
  summary = {
      "status": status, "steps": step, "total_steps": total_steps, "seconds": round(time.time() - t_run, 2),
      "model": cfg.model, "lr": lr, "context_len": c_len, "response_len": r_len,
      "train_examples": {"preference": len(prefs), "general": len(general)},
      "held_out": {"preference": len(eval_pref), "general": len(eval_general)},
      "tokenization": tstats.as_dict(), "bad_lines": bad.count,
      "last_metrics": {k: _host(v) for k, v in last_metrics.items() if not k.startswith("grad/")},
      "last_monitor": figures and {k: v for k, v in figures.items() if "/layer_" not in k},
      "paths": {"run_dir": os.path.abspath(cfg.run_dir), "checkpoints": os.path.abspath(ckpt.directory),
                "tensorboard": os.path.join(os.path.abspath(cfg.run_dir), "tb"),
                "monitor": os.path.abspath(guard.path)},
  }
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1, default=float)
  return summary
