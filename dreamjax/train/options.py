"""The options of a training session, each defined once: its default, its help and its choices.

`TrainOptions` holds every setting the train step, the optimizer, the mesh, checkpoints and the
guard read. `dreamjax.train.loop.RunConfig` (launch.train) and `dreamjax.dream.cycle.CycleConfig`
(launch.dream) extend it with their own fields, and both launchers define their absl flags from
the fields (`launch/flags.py`): an option added here is a flag of both, with one help text.

    @dataclasses.dataclass
    class MyConfig(TrainOptions):
      rounds: int = option(3, "Rounds to run.")
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence

import optax

from dreamjax import objectives as obj
from dreamjax import optim
from dreamjax.model import config as model_config_lib
from dreamjax.train import guard as guard_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import step as step_lib

OPTIMIZERS = ("apollo", "apollo_mini", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
REMAT_POLICIES = ("full", "dots")
PRESET_LR = 3e-3  # from-scratch tiny presets: 1e-5 would not move a random init in minutes
MODEL_LR = 1e-5  # fine-tuning a model folder


class RunError(RuntimeError):
  """A run cannot start or continue; the message says what and where (the flag, the file)."""


def option(default: Any, help: str, choices: Optional[Sequence[str]] = None):  # pylint: disable=redefined-builtin
  """Returns a dataclass field carrying its flag's help (and, for an enum flag, its choices)."""
  meta = {"help": help}
  if choices is not None:
    meta["choices"] = tuple(choices)
  if isinstance(default, (list, dict, set)):
    raise TypeError("option defaults must be immutable (use a tuple)")
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainOptions:
  """Everything a training session reads (see module docstring); subclasses add their own fields."""

  model: str = option("qwen3-tiny", "Local HF model folder, or a tiny preset: "
                      + " | ".join(sorted(model_config_lib.PRESETS)) + ".")
  run_dir: str = option("runs/default", "Run folder: checkpoints, tb, monitor.jsonl, summary.json.")
  resume: bool = option(True, "Resume from the run folder's newest checkpoint if there is one.")
  seed: int = option(0, "Seed of init, data order and projections.")
  general_data: tuple[str, ...] = option((), "General-text JSONL ({\"text\": ...}) replayed in every batch; "
                                         "repeatable. Default: the built-in text.")
  general_ratio: float = option(0.25, "Share of each batch taken by general data.")
  objective: str = option("orpo", "Preference objective.", choices=tuple(obj.OBJECTIVES))
  beta: float = option(0.1, "ORPO's lambda (TRL's beta) or DPO's beta.")
  gradient_mode: str = option("frozen", "frozen: context encoded once without gradient; full: backprop through it.",
                              choices=step_lib.GRADIENT_MODES)
  optimizer: str = option("apollo", "Optimizer.", choices=OPTIMIZERS)
  rank: int = option(256, "APOLLO rank (clipped to the smallest projected dimension).")
  apollo_scale: Optional[float] = option(None, "APOLLO / APOLLO-Mini scale (default: theirs, 1 and 128).")
  update_proj_gap: int = option(200, "APOLLO: steps between projection refreshes.")
  weight_decay: float = option(0.0, "Decoupled weight decay.")
  b1: float = option(0.9, "Adam beta1.")
  b2: float = option(0.999, "Adam beta2.")
  lr: Optional[float] = option(None, f"Peak learning rate (default {MODEL_LR}; {PRESET_LR} for a from-scratch preset).")
  schedule: str = option("constant", "Learning-rate schedule after warmup.", choices=SCHEDULES)
  warmup_steps: int = option(0, "Linear warmup steps.")
  batch_size: int = option(8, "Examples per optimizer step (preference + general): the global batch, over all "
                           "devices and all --grad_accum micro-batches.")
  grad_accum: int = option(1, "Micro-batches per step (exact large-batch gradient).")
  dropout: float = option(0.0, "Residual dropout while training (attention and MLP outputs), in [0, 1).")
  max_context_len: int = option(1024, "Context tokens kept (cut from the left).")
  max_response_len: int = option(256, "Response tokens kept (cut from the right).")
  mesh: str = option("-1,1", "DATA,FSDP device mesh, e.g. '8,1', '2,4', '-1,1'.")
  keep: int = option(3, "Checkpoints kept (plus the newest that passed the guard).")
  eval_examples: int = option(16, "Examples held out for the monitors.")
  remat: bool = option(False, "Rematerialise each scanned block of layers in the backward pass.")
  remat_policy: str = option("full", "With --remat: 'full' keeps only block inputs, 'dots' also the projection "
                             "outputs (faster, more memory).", choices=REMAT_POLICIES)
  bf16: bool = option(False, "bf16 compute over float32 master weights.")
  attention_impl: str = option("auto", "Attention implementation ('auto': by platform; see README).",
                               choices=model_config_lib.ATTENTION_IMPLEMENTATIONS)
  prefill_chunk: int = option(4096, "Frozen contexts are encoded this many tokens at a time (memory linear in the "
                              "context; 0: at once).")
  max_perplexity_ratio: Optional[float] = option(1.5, "Guard: held-out perplexity / base (abort above).")
  max_weight_drift: Optional[float] = option(None, "Guard: max per-layer relative weight drift (default 0.5; off "
                                             "for presets).")
  max_residual_growth_vs_base: Optional[float] = option(
      None, "Guard: max per-layer residual growth relative to the base (default 2.0; off for presets).")
  max_chosen_logp_fall: Optional[float] = option(1.0, "Guard: nats the held-out preferred log-prob may fall.")
  max_nonfinite_steps: int = option(10, "Guard: NaN/Inf steps skipped before aborting.")

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


# The options a resumed run must keep (with the model's architecture, 'model_config'): they decide
# the train state's structure or the order of its batches. Each driver adds its own.
RESUME_OPTIONS = ("model_config", "general_data", "general_ratio", "objective", "gradient_mode", "optimizer", "rank",
                  "batch_size", "seed", "eval_examples")


# The options that shape the compiled train step (with the model config, the lr and the mesh).
STEP_OPTIONS = ("objective", "beta", "gradient_mode", "optimizer", "rank", "apollo_scale", "update_proj_gap",
                "weight_decay", "b1", "b2", "schedule", "warmup_steps", "grad_accum", "dropout", "remat",
                "remat_policy", "bf16", "seed")


def _check_choices(opts) -> None:
  for f in dataclasses.fields(opts):
    choices = f.metadata.get("choices")
    if choices is not None and getattr(opts, f.name) not in choices + (f.default,):
      raise RunError(f"--{f.name}: {getattr(opts, f.name)!r} is not one of {', '.join(choices)}")


def validate(opts: TrainOptions) -> None:
  """Raises RunError naming the flag of the first bad training setting."""
  _check_choices(opts)
  if opts.prefill_chunk < 0:
    raise RunError(f"--prefill_chunk: must be >= 0 (0: the whole context at once), got {opts.prefill_chunk}")
  for name in ("batch_size", "grad_accum", "max_context_len", "max_response_len", "keep", "eval_examples", "rank",
               "update_proj_gap"):
    if getattr(opts, name) < 1:
      raise RunError(f"--{name}: must be >= 1, got {getattr(opts, name)}")
  for name in ("warmup_steps", "max_nonfinite_steps"):
    if getattr(opts, name) < 0:
      raise RunError(f"--{name}: must be >= 0, got {getattr(opts, name)}")
  if not 0.0 <= opts.general_ratio < 1.0:
    raise RunError(f"--general_ratio: must be in [0, 1), got {opts.general_ratio}")
  if opts.lr is not None and not opts.lr > 0:
    raise RunError(f"--lr: must be > 0, got {opts.lr}")
  if not 0.0 <= opts.dropout < 1.0:
    raise RunError(f"--dropout: must be in [0, 1), got {opts.dropout}")
  if opts.batch_size % opts.grad_accum:
    raise RunError(f"--batch_size {opts.batch_size} is not divisible by --grad_accum {opts.grad_accum}")
  try:
    mesh_lib.parse_mesh_flag(opts.mesh)
  except ValueError as e:
    raise RunError(str(e)) from None


def learning_rate(opts: TrainOptions, is_preset: bool) -> float:
  return opts.lr if opts.lr is not None else (PRESET_LR if is_preset else MODEL_LR)


def schedule_fn(opts: TrainOptions, lr: float, total_steps: int) -> optax.Schedule:
  """Returns the learning-rate schedule: linear warmup, then constant, cosine or linear decay to 0."""
  if opts.schedule == "constant":
    tail = optax.constant_schedule(lr)
  else:
    decay = max(total_steps - opts.warmup_steps, 1)
    tail = optax.cosine_decay_schedule(lr, decay) if opts.schedule == "cosine" else optax.linear_schedule(lr, 0.0, decay)
  if not opts.warmup_steps:
    return tail
  return optax.join_schedules([optax.linear_schedule(0.0, lr, opts.warmup_steps), tail], [opts.warmup_steps])


def make_optimizer(opts: TrainOptions, lr: float, total_steps: int):
  """Returns (optimizer, learning-rate schedule)."""
  sched = schedule_fn(opts, lr, total_steps)
  kw = dict(b1=opts.b1, b2=opts.b2, weight_decay=opts.weight_decay, key=opts.seed)
  scale = {"scale": opts.apollo_scale} if opts.apollo_scale else {}
  if opts.optimizer == "apollo":
    opt = optim.apollo(sched, rank=opts.rank, update_proj_gap=opts.update_proj_gap, **scale, **kw)
  elif opts.optimizer == "apollo_mini":
    opt = optim.apollo_mini(sched, update_proj_gap=opts.update_proj_gap, **scale, **kw)
  else:
    opt = optax.adamw(sched, b1=opts.b1, b2=opts.b2, weight_decay=opts.weight_decay)
  return opt, sched


def guard_config(opts: TrainOptions, is_preset: bool) -> guard_lib.GuardConfig:
  """Returns the guard's limits: drift and residual growth default on for a model folder, off for a
  preset (whose base is a random init, so drift from it means nothing)."""
  default = lambda v, d: v if (v or is_preset) else d
  return guard_lib.GuardConfig(
      max_perplexity_ratio=opts.max_perplexity_ratio, max_weight_drift=default(opts.max_weight_drift, 0.5),
      max_residual_growth_vs_base=default(opts.max_residual_growth_vs_base, 2.0),
      max_chosen_logp_fall=opts.max_chosen_logp_fall, max_nonfinite_steps=opts.max_nonfinite_steps)
