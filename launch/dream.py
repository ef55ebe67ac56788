"""The dream loop: dream triplets with the current model, train a few steps on them, repeat.

    python -m launch.dream                         # embedded default: tiny model, shipped memories, 3 cycles
    python -m launch.dream --model /models/Qwen3-8B --memories mem.jsonl --templates t.jsonl \
        --rules rules.jsonl --cycles 20 --scenarios 256 --run_dir runs/dream1 --lr 1e-6
    python -m launch.dream --flagfile dream1.flags

A run folder that holds checkpoints is resumed at the first unfinished cycle unless --noresume
(a thin main over dreamjax.dream.cycle).
"""

import json
import sys

from absl import app, flags, logging

from dreamjax.data import jsonl
from dreamjax.dream import cycle
from dreamjax.dream.scorer import ScorerError
from dreamjax.model import ConfigError
from dreamjax.model.hf import CheckpointError as ModelFileError
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import loop as train_loop

_D = cycle.CycleConfig()
F = flags
F.DEFINE_string("model", _D.model, "Local HF model folder, or a tiny preset: qwen3-tiny | qwen3_5-tiny.")
F.DEFINE_string("run_dir", _D.run_dir, "Run folder: triplets, checkpoints, cycles.jsonl, monitor.jsonl, tb.")
F.DEFINE_integer("cycles", _D.cycles, "Dream + train cycles (a resumed run continues up to this many).")
F.DEFINE_integer("scenarios", _D.scenarios, "Scenarios dreamt per cycle.")
F.DEFINE_integer("seed", _D.seed, "Base seed: cycle k dreams with seed + k; also init, order, projections.")
F.DEFINE_string("memories", _D.memories, "Memory graph JSONL (default: the shipped example).")
F.DEFINE_string("templates", _D.templates, "Scenario templates JSONL (default: the shipped examples with targets).")
F.DEFINE_string("rules", _D.rules, "Rule scorer JSONL (default: the shipped example rules).")
F.DEFINE_enum("scorer", _D.scorer or None, list(cycle.SCORERS),
              "Training-signal agent: rules (--rules) | judge (model judge) | command (--scorer_command). "
              "Default: command if --scorer_command is set, else rules.")
F.DEFINE_string("scorer_command", _D.scorer_command, "External grader command (JSON lines in/out).")
F.DEFINE_enum("judge", _D.judge, ["base", "current"], "Model judge's params: the frozen base or the current model.")
F.DEFINE_string("judge_template", _D.judge_template,
                "Model judge prompt with {prompt} {response} {kind}; it compares log p(' yes') and log p(' no').")
F.DEFINE_integer("recall_k", _D.recall_k, "Fast stage: memories retrieved into a template's {recalled}.")
F.DEFINE_integer("replay_cycles", _D.replay_cycles, "Slow stage: cycles a new memory is favoured as a walk seed "
                 "(0: uniform seeds).")
F.DEFINE_float("replay_decay", _D.replay_decay, "Slow stage: per-cycle decay of a fresh memory's seed weight.")
F.DEFINE_float("fresh_share", _D.fresh_share, "Slow stage: share of walk seeds on fresh memories; the rest "
               "replays older ones.")
F.DEFINE_integer("eval_scenarios", _D.eval_scenarios, "Held-out scenarios the monitor scores each cycle (0: none).")
F.DEFINE_list("temperatures", [str(t) for t in _D.temperatures], "Sampling temperature sweep, comma-separated.")
F.DEFINE_integer("samples_per_temperature", _D.samples_per_temperature, "Answers per scenario per temperature.")
F.DEFINE_integer("max_new_tokens", _D.max_new_tokens, "Longest dreamt answer (tokens).")
F.DEFINE_float("top_p", _D.top_p, "Nucleus sampling mass.")
F.DEFINE_integer("gen_batch_size", _D.gen_batch_size, "Generation rows per call.")
F.DEFINE_integer("max_prompt_tokens", _D.max_prompt_tokens, "Dream prompts keep their last N tokens.")
F.DEFINE_float("min_margin", _D.min_margin, "Keep a pair when score(chosen) - score(rejected) >= this.")
F.DEFINE_float("min_kind_share", _D.min_kind_share, "Warn when a kind's share of the kept pairs is below this.")
F.DEFINE_integer("walk_length", _D.walk_length, "Steps per random walk.")
F.DEFINE_integer("n_walks", _D.n_walks, "Walks per scenario (2 or more: a collision).")
F.DEFINE_integer("min_distance", _D.min_distance, "Fewest hops between colliding walks' seeds.")
F.DEFINE_multi_string("general_data", [], "General-text JSONL replayed in every batch (default: built-in text).")
F.DEFINE_float("general_ratio", _D.general_ratio, "Share of each batch taken by general replay.")
F.DEFINE_enum("objective", _D.objective, list(train_loop.OBJECTIVES), "Preference objective.")
F.DEFINE_float("beta", _D.beta, "ORPO's lambda (TRL's beta) or DPO's beta.")
F.DEFINE_enum("gradient_mode", _D.gradient_mode, ["frozen", "full"], "frozen: context encoded once without gradient.")
F.DEFINE_enum("optimizer", _D.optimizer, list(train_loop.OPTIMIZERS), "Optimizer.")
F.DEFINE_integer("rank", _D.rank, "APOLLO rank.")
F.DEFINE_integer("update_proj_gap", _D.update_proj_gap, "APOLLO: steps between projection refreshes.")
F.DEFINE_float("lr", None, f"Learning rate (default 1e-5; {train_loop.PRESET_LR} for a from-scratch preset).")
F.DEFINE_integer("batch_size", _D.batch_size, "Examples per step (triplets + general replay).")
F.DEFINE_integer("steps_per_cycle", _D.steps_per_cycle, "Max train steps per cycle (0: one pass over its triplets).")
F.DEFINE_integer("max_context_len", _D.max_context_len, "Context tokens kept in training (cut from the left).")
F.DEFINE_integer("max_response_len", _D.max_response_len, "Response tokens kept in training.")
F.DEFINE_string("mesh", _D.mesh, "DATA,FSDP device mesh, e.g. '8,1', '-1,1'.")
F.DEFINE_integer("keep", _D.keep, "Checkpoints kept (one per cycle; plus the newest that passed the guard).")
F.DEFINE_integer("eval_examples", _D.eval_examples, "General examples held out for the monitors.")
F.DEFINE_bool("resume", _D.resume, "Resume at the first unfinished cycle if the run folder has a checkpoint.")
F.DEFINE_float("max_perplexity_ratio", _D.max_perplexity_ratio, "Guard: held-out perplexity / base (abort above).")
F.DEFINE_float("max_weight_drift", None, "Guard: max per-layer relative weight drift (default 0.5; off for presets).")
F.DEFINE_float("max_residual_growth_vs_base", None,
               "Guard: max per-layer residual growth relative to the base (default 2.0; off for presets).")

FLAGS = flags.FLAGS
_ERRORS = (cycle.RunError, jsonl.DataError, ConfigError, ModelFileError, ckpt_lib.CheckpointError, ScorerError)


def config_from_flags() -> cycle.CycleConfig:
  kw = {f.name: FLAGS[f.name].value for f in cycle.dataclasses.fields(cycle.CycleConfig)}
  try:
    kw["temperatures"] = tuple(float(t) for t in kw["temperatures"])
  except ValueError:
    raise cycle.RunError(f"--temperatures: {','.join(kw['temperatures'])!r} is not a comma-separated list of "
                         "numbers") from None
  kw["general_data"] = tuple(kw["general_data"])
  kw["scorer"] = kw["scorer"] or ""
  return cycle.CycleConfig(**kw)


def _print_cycle(r: dict) -> None:
  d = r["dream"]
  ppl = r["monitor"].get("perplexity/ratio")
  margin = cycle._margin(r["monitor"])  # pylint: disable=protected-access
  c = r["consolidation"]
  print(f"cycle {r['cycle']}: scenarios {d['scenarios']} (skipped {d['skipped_existing']} already written), "
        f"kept {d['kept']} {d['kept_per_kind']}, steps {r['model_step']}->{r['step']}, loss "
        f"{r['loss_first'] if r['loss_first'] is None else round(r['loss_first'], 4)}->"
        f"{r['loss_last'] if r['loss_last'] is None else round(r['loss_last'], 4)}, perplexity ratio "
        f"{ppl if ppl is None else round(ppl, 4)}, held-out margin {margin if margin is None else round(margin, 3)}, "
        f"memories {c['memories']} ({c['fresh']} fresh, seed share {c['fresh_seed_share']:.2f}), "
        f"guard {r['guard']['action']}, {r['seconds']['total']} s",
        flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    summary = cycle.run(config_from_flags(), on_cycle=_print_cycle)
  except _ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: summary[k] for k in ("status", "cycles_done", "step", "kept", "kept_per_kind", "seconds",
                                             "paths")}, indent=1))
  sys.exit(0 if summary["status"].startswith(("finished", "preempted")) else 3)


if __name__ == "__main__":
  app.run(main)
