"""Main job: trains a model on preference data (absl flags; a thin main over dreamjax.train.loop).

    python -m launch.train                      # the embedded default: tiny model, built-in data
    python -m launch.train --model /models/Qwen3-8B --data prefs.jsonl --general_data web.jsonl \
        --run_dir runs/exp1 --mesh 1,8 --optimizer apollo_mini --lr 1e-5
    python -m launch.train --flagfile exp1.flags

A run folder that holds checkpoints is resumed (exactly) unless --noresume.
"""

import json
import sys

from absl import app, flags, logging

from dreamjax.data import jsonl
from dreamjax.model import ConfigError
from dreamjax.model import config as model_config_lib
from dreamjax.model.hf import CheckpointError as ModelFileError
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import loop

_D = loop.RunConfig()
F = flags
F.DEFINE_string("model", _D.model, "Local HF model folder, or a tiny preset: qwen3-tiny | qwen3_5-tiny.")
F.DEFINE_multi_string("data", [], "Preference JSONL (TRL prompt/chosen/rejected); repeatable. Default: built-in set.")
F.DEFINE_multi_string("general_data", [], "General-text JSONL ({\"text\": ...}) replayed in every batch; repeatable.")
F.DEFINE_float("general_ratio", _D.general_ratio, "Share of each batch taken by general data.")
F.DEFINE_enum("objective", _D.objective, list(loop.OBJECTIVES), "Preference objective.")
F.DEFINE_float("beta", _D.beta, "ORPO's lambda (TRL's beta) or DPO's beta.")
F.DEFINE_enum("gradient_mode", _D.gradient_mode, ["frozen", "full"], "frozen: context encoded once without gradient.")
F.DEFINE_enum("optimizer", _D.optimizer, list(loop.OPTIMIZERS), "Optimizer.")
F.DEFINE_integer("rank", _D.rank, "APOLLO rank.")
F.DEFINE_float("apollo_scale", None, "APOLLO / APOLLO-Mini scale (default 1 / 128).")
F.DEFINE_integer("update_proj_gap", _D.update_proj_gap, "APOLLO: steps between projection refreshes.")
F.DEFINE_float("weight_decay", _D.weight_decay, "Decoupled weight decay.")
F.DEFINE_float("b1", _D.b1, "Adam beta1.")
F.DEFINE_float("b2", _D.b2, "Adam beta2.")
F.DEFINE_float("lr", None, f"Peak learning rate (default 1e-5; {loop.PRESET_LR} for a from-scratch preset).")
F.DEFINE_enum("schedule", _D.schedule, list(loop.SCHEDULES), "Learning-rate schedule after warmup.")
F.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warmup steps.")
F.DEFINE_integer("batch_size", _D.batch_size, "Examples per step (preference + general).")
F.DEFINE_integer("grad_accum", _D.grad_accum, "Micro-batches per step (exact large-batch gradient).")
F.DEFINE_float("dropout", _D.dropout, "Residual dropout while training (attention and MLP outputs), in [0, 1).")
F.DEFINE_integer("max_context_len", _D.max_context_len, "Context tokens kept (cut from the left).")
F.DEFINE_integer("max_response_len", _D.max_response_len, "Response tokens kept (cut from the right).")
F.DEFINE_enum("overlong", _D.overlong, ["truncate", "drop"], "What to do with over-long examples.")
F.DEFINE_integer("epochs", _D.epochs, "Passes over the preference data (default 1: never repeat).")
F.DEFINE_string("mesh", _D.mesh, "DATA,FSDP device mesh, e.g. '8,1', '2,4', '-1,1'.")
F.DEFINE_string("run_dir", _D.run_dir, "Run folder: checkpoints, tb, monitor.jsonl, summary.json.")
F.DEFINE_bool("resume", _D.resume, "Resume from the run folder's newest checkpoint if there is one.")
F.DEFINE_integer("save_every", _D.save_every, "Checkpoint every N steps (and at the end).")
F.DEFINE_integer("keep", _D.keep, "Checkpoints kept (plus the newest that passed the guard).")
F.DEFINE_integer("eval_every", _D.eval_every, "Monitor and guard every N steps.")
F.DEFINE_integer("eval_examples", _D.eval_examples, "Examples held out for the monitors.")
F.DEFINE_integer("seed", _D.seed, "Seed of init, data order and projections.")
F.DEFINE_integer("max_steps", _D.max_steps, "Stop after N steps (0: the whole pass).")
F.DEFINE_bool("remat", _D.remat, "Rematerialise each scanned block of layers in the backward pass.")
F.DEFINE_enum("remat_policy", _D.remat_policy, ["full", "dots"],
              "With --remat: 'full' keeps only block inputs, 'dots' also the projection outputs (faster, more memory).")
F.DEFINE_enum("attention_impl", _D.attention_impl, list(model_config_lib.ATTENTION_IMPLEMENTATIONS),
              "Attention implementation ('auto': by platform; see README).")
F.DEFINE_integer("prefill_chunk", _D.prefill_chunk,
                 "Frozen contexts are encoded this many tokens at a time (memory linear in the context; 0: at once).")
F.DEFINE_bool("bf16", _D.bf16, "bf16 compute over float32 master weights.")
F.DEFINE_bool("skip_bad_lines", _D.skip_bad_lines, "Record bad data lines in RUN/bad_lines.txt instead of failing.")
F.DEFINE_float("max_perplexity_ratio", _D.max_perplexity_ratio, "Guard: held-out perplexity / base (abort above).")
F.DEFINE_float("max_weight_drift", None, "Guard: max per-layer relative weight drift (default 0.5; off for presets).")
F.DEFINE_float("max_residual_growth_vs_base", None,
               "Guard: max per-layer residual growth relative to the base (default 2.0; off for presets).")
F.DEFINE_float("max_chosen_logp_fall", _D.max_chosen_logp_fall, "Guard: nats the preferred log-prob may fall.")
F.DEFINE_integer("max_nonfinite_steps", _D.max_nonfinite_steps, "Guard: NaN/Inf steps skipped before aborting.")

FLAGS = flags.FLAGS
_ERRORS = (loop.RunError, jsonl.DataError, ConfigError, ModelFileError, ckpt_lib.CheckpointError)


def config_from_flags() -> loop.RunConfig:
  kw = {f.name: FLAGS[f.name].value for f in loop.dataclasses.fields(loop.RunConfig)}
  kw["data"], kw["general_data"] = tuple(kw["data"]), tuple(kw["general_data"])
  return loop.RunConfig(**kw)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console to the bar
    logging.set_verbosity(logging.WARNING)
  cfg = config_from_flags()
  try:
    summary = loop.run(cfg)
  except _ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: summary[k] for k in ("status", "steps", "seconds", "last_metrics", "paths")}, indent=1))
  sys.exit(0 if summary["status"].startswith(("finished", "preempted")) else 3)


if __name__ == "__main__":
  app.run(main)
