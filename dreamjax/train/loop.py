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
the uninterrupted run (CPU). SIGTERM or SIGINT (Ctrl-C) finishes the step, saves and exits 0;
a second one ends the process at once, leaving the newest committed checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from absl import logging
import numpy as np

from dreamjax.data import builtin, jsonl, mix
from dreamjax.data import tokenize as tok_lib
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import options as options_lib
from dreamjax.train import session as session_lib
from dreamjax.train.options import option

RunError = options_lib.RunError


@dataclasses.dataclass
class RunConfig(options_lib.TrainOptions):
  """Every setting of a training run: the session's options and the data's (launch/train.py's flags)."""

  data: tuple[str, ...] = option((), "Preference JSONL (TRL prompt/chosen/rejected); repeatable. Default: the "
                                 "built-in set.")
  eval_data: tuple[str, ...] = option((), "Held-out preference JSONL, repeatable: evaluated every --eval_every steps "
                                      "with the training objective's metrics (eval/eval_data/...) and used for the "
                                      "guard's log-prob trend; given, no preference example is carved out of --data.")
  overlong: str = option("truncate", "What to do with over-long examples.", choices=tok_lib.OVERLONG)
  epochs: int = option(1, "Passes over the preference data (default 1: never repeat).")
  max_steps: int = option(0, "Stop after N steps (0: the whole pass).")
  save_every: int = option(100, "Checkpoint every N steps (and at the end).")
  eval_every: int = option(50, "Monitor and guard every N steps.")
  skip_bad_lines: bool = option(False, "Record bad data lines in RUN/bad_lines.txt instead of failing.")


# Fields that must match on resume: they decide the state's structure or the batches' order.
RESUME_KEYS = options_lib.RESUME_OPTIONS + ("data", "epochs")


def validate(cfg: RunConfig) -> None:
  """Raises RunError naming the flag of the first bad setting."""
  options_lib.validate(cfg)
  for name in ("epochs", "save_every", "eval_every"):
    if getattr(cfg, name) < 1:
      raise RunError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
  if cfg.max_steps < 0:
    raise RunError(f"--max_steps: must be >= 0 (0: the whole pass), got {cfg.max_steps}")
  if cfg.objective in ("dpo", "dpop") and cfg.general_ratio > 0:
    logging.info("dpo/dpop: general examples get the SFT loss; the reference model is the base model")


# ---------------------------------------------------------------------------------------------
# Data.


def _read_all(paths, reader, cfg, bad, bad_file):
  out = []
  for p in paths:
    out += reader(p, skip_bad_lines=cfg.skip_bad_lines, bad_lines_file=bad_file, bad=bad)
  return out


def load_data(cfg: RunConfig, tokenizer, run_dir: str):
  """Returns (preference, general, eval_pref, eval_general, stats, bad) as TokenizedExamples."""
  pref_paths = cfg.data or (builtin.PREFERENCES,)
  general_paths = cfg.general_data or ((builtin.GENERAL,) if not cfg.data else ())
  bad, bad_file = jsonl.BadLines(), os.path.join(run_dir, "bad_lines.txt") if mesh_lib.is_main_process() else None
  prefs = _read_all(pref_paths, jsonl.read_preferences, cfg, bad, bad_file)
  texts = _read_all(general_paths, jsonl.read_texts, cfg, bad, bad_file)
  stats = tok_lib.TokenStats()
  tp = [tok_lib.encode_preference(e, tokenizer, cfg.max_context_len, cfg.max_response_len, cfg.overlong, stats)
        for e in prefs]
  tp = [e for e in tp if e is not None]
  tg = [tok_lib.encode_text(e, tokenizer, cfg.max_response_len + 1, stats) for e in texts]
  # Held-out examples for the monitors: --eval_data, else a seeded choice of --data; never trained on.
  n_eval = cfg.eval_examples
  rng = np.random.default_rng([cfg.seed, 7])
  if cfg.eval_data:
    held = _read_all(cfg.eval_data, jsonl.read_preferences, cfg, bad, bad_file)
    eval_pref = [tok_lib.encode_preference(e, tokenizer, cfg.max_context_len, cfg.max_response_len, cfg.overlong,
                                           stats) for e in held]
    eval_pref = [e for e in eval_pref if e is not None]
    if not eval_pref:
      raise RunError(f"--eval_data: no usable preference example in {', '.join(cfg.eval_data)} "
                     f"(--overlong {cfg.overlong} dropped them all)")
  else:
    if len(tp) <= n_eval:
      raise RunError(f"--data: {len(tp)} usable preference examples; need more than --eval_examples={n_eval} "
                     "(which are held out for the monitors)")
    eval_pref, tp = mix.hold_out(tp, n_eval, rng)
  eval_general, tg = mix.hold_out(tg, min(n_eval, len(tg) // 2), rng) if tg else ([], tg)
  return tp, tg, eval_pref, eval_general, stats, bad


def shapes(examples, cfg: RunConfig) -> tuple[int, int]:
  """Returns static (context_len, response_len): the data's longest, capped by the flags."""
  c = max(len(e.context) for e in examples)
  r = max(max(len(e.chosen), len(e.rejected or ())) for e in examples)
  round_up = lambda n, m: -(-n // m) * m
  return min(round_up(c, 8), cfg.max_context_len), min(round_up(r, 8), cfg.max_response_len)


# ---------------------------------------------------------------------------------------------
# The run.


def _quiet(message: str) -> None:
  del message


def run(cfg: RunConfig, progress: Callable[[str], None] = _quiet) -> dict:
  """Trains; returns the summary (also written to RUN/summary.json). Raises RunError on bad input.

  progress: called with a line about each slow stage before the first step (loading the model
  and the data, compiling the step); quiet by default (the launcher prints them).

  A run whose checkpoint is already at its last step does nothing: it returns the summary.json
  written when it finished (or, without one, a short summary it does not write), marked
  `nothing_to_do`. SIGTERM or SIGINT (Ctrl-C) finishes the current step, saves and returns with
  status "preempted at step N; saved"; a signal during the finish (after the last step) lets
  the finish complete (`checkpoint.PreemptionGuard`).
  """
  validate(cfg)
  session_lib.prepare_run_dir(cfg.run_dir)
  mesh = session_lib.make_mesh(cfg)
  progress(f"loading {cfg.model}…")
  model = session_lib.load_model(cfg, mesh)
  progress("reading and tokenizing the data…")
  prefs, general, eval_pref, eval_general, tstats, bad = load_data(cfg, model.tokenizer, cfg.run_dir)
  if tstats.context_truncated or tstats.response_truncated or tstats.dropped_overlong:
    logging.warning("over-long examples: %s (--max_context_len %d, --max_response_len %d, --overlong %s)",
                    tstats.as_dict(), cfg.max_context_len, cfg.max_response_len, cfg.overlong)
  if bad.count:
    logging.warning("skipped %d bad data line(s); see %s", bad.count, os.path.join(cfg.run_dir, "bad_lines.txt"))
  c_len, r_len = shapes(prefs + general + eval_pref + eval_general, cfg)

  mixer = mix.Mixer(prefs, general, batch_size=cfg.batch_size,
                    general_ratio=cfg.general_ratio if general else 0.0, epochs=cfg.epochs, seed=cfg.seed)
  full_batches = mixer.total_batches() - (cfg.epochs if len(prefs) % mixer.n_pref else 0)
  total_steps = min(full_batches, cfg.max_steps) if cfg.max_steps else full_batches
  if total_steps < 1:
    raise RunError(f"--batch_size {cfg.batch_size}: {len(prefs)} training examples make no full batch")
  lr = options_lib.learning_rate(cfg, model.is_preset)
  run_config = dict(cfg.to_json(), lr=lr, model_config=model.config.architecture(), context_len=c_len,
                    response_len=r_len, total_steps=total_steps)
  progress(f"data: {len(prefs)} preference + {len(general)} general examples ({len(eval_pref)} + "
           f"{len(eval_general)} held out); {total_steps} steps of {cfg.batch_size}; setting up {cfg.run_dir}…")
  s = session_lib.Session(cfg, model, run_config=run_config, resume_keys=RESUME_KEYS, total_steps=total_steps,
                          shapes=(c_len, r_len), eval_general=eval_general, eval_preference=eval_pref,
                          save_every=cfg.save_every, grad_log_every=cfg.eval_every, mesh=mesh,
                          eval_metrics=bool(cfg.eval_data))
  summary_path = os.path.join(cfg.run_dir, "summary.json")
  if s.start >= total_steps:  # finished before: keep its summary
    s.close()
    return _nothing_to_do(s, summary_path)
  if s.position is not None:
    mixer.position = mix.MixerPosition.from_dict(s.position)
    progress(f"resumed {cfg.run_dir} at step {s.start} of {total_steps}")

  status, start = "finished", s.start
  t_run = time.time()
  with ckpt_lib.PreemptionGuard() as preempt:
    progress("compiling the train step (first step)…")
    while s.step_count < total_steps:
      mb = next(mixer, None)
      if mb is None:
        break
      if len(mb.preference) != mixer.n_pref:  # a short last batch would recompile; skip it, logged
        logging.info("skipping a final partial batch of %d preference examples", len(mb.preference))
        continue
      decision = s.step(mb.preference + mb.general)
      step = s.step_count
      if (decision is None or decision.action != "abort") and (step % cfg.eval_every == 0 or step == total_steps):
        decision = s.evaluate()
      if decision is not None and decision.action == "abort":
        status = s.rollback(f"aborted at step {step}", decision)
        break
      s.save(mixer.position.to_dict(), force=step == total_steps)
      if step < total_steps and preempt.should_stop(step):
        s.save(mixer.position.to_dict(), force=True)
        status = f"preempted at step {step}; saved"
        break
    preempt.finishing()  # from here a first signal lets the final save and the summary complete
    s.close()
    step = s.step_count
    summary = {
        "status": status, "steps": step, "total_steps": total_steps, "seconds": round(time.time() - t_run, 2),
        "model": cfg.model, "lr": lr, "context_len": c_len, "response_len": r_len,
        "train_examples": {"preference": len(prefs), "general": len(general)},
        "held_out": {"preference": len(eval_pref), "general": len(eval_general)},
        "tokenization": tstats.as_dict(), "bad_lines": bad.count,
        "last_metrics": s.last_metrics,
        "last_monitor": s.last_figures and {k: v for k, v in s.last_figures.items() if "/layer_" not in k},
        "paths": s.paths(),
    }
    if step > start and mesh_lib.is_main_process():  # process 0 writes the run's files; a session that
      write_summary(summary_path, summary)  # trained no step (its data ran out) leaves the summary as it was
  return summary


def write_summary(path: str, summary: dict) -> None:
  """Writes RUN/summary.json atomically: a process killed while writing leaves the previous one."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1, default=float)
  os.replace(tmp, path)


def _nothing_to_do(s: session_lib.Session, summary_path: str) -> dict:
  """Returns the summary of a run that had already finished (not rewritten), marked nothing_to_do."""
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  else:  # finished, but killed before its summary was written
    summary = {"status": "finished", "steps": s.start, "total_steps": s.total_steps, "seconds": 0.0,
               "last_metrics": {}, "paths": s.paths()}
  return dict(summary, nothing_to_do=True)
