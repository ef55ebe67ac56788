"""absl flags made from a config dataclass: one flag per field, with the field's help and choices.

Both launchers call `define(ConfigClass)` and `resolve(ConfigClass)`; the fields (and their help)
are defined once, in `dreamjax.train.options.TrainOptions` and the drivers' subclasses. A field
typed `tuple[str, ...]` is a repeatable string flag, `tuple[float, ...]` a comma-separated list,
`Optional[float]` a float flag whose default is None.

TRL's names for the same settings (`TRL_ALIASES`: --learning_rate, --output_dir, ...) are absl
aliases of the project's flags, defined for the fields a launcher has.

A run folder records its run config (RUN/config.json, written by the session at the first start),
so `--run_dir R` alone continues a run: `resolve` gives every field whose flag was not given on the
command line the value R/config.json records; a given flag wins (and one that changes a setting a
resume must keep is refused by the session, naming the field). `resume_command` prints the
shortest command that continues a run.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import typing
from typing import Any, Optional

from absl import flags

from dreamjax.model import config as model_config_lib
from dreamjax.train import options as options_lib

RECORD = "config.json"  # RUN/config.json: the run config, written at the first start
# Never taken from the record: where the run is, and whether to continue it, come from the command line.
NOT_RECORDED = ("run_dir", "resume")

# TRL / transformers TrainingArguments names -> this project's flags, where the meaning matches.
# Same name in both already: seed, beta, bf16, max_steps, warmup_steps, weight_decay.
TRL_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "schedule",
    "adam_beta1": "b1",
    "adam_beta2": "b2",
    "output_dir": "run_dir",
    "save_steps": "save_every",
    "save_total_limit": "keep",
    "eval_steps": "eval_every",
    "gradient_checkpointing": "remat",
    "max_prompt_length": "max_context_len",
    "max_completion_length": "max_response_len",
    "model_name_or_path": "model",
}
# Where TRL's meaning differs in a way a user must know, the alias's help says how.
_ALIAS_NOTES = {
    "per_device_train_batch_size": "Here it sets the GLOBAL batch: examples per optimizer step over all devices and "
                                   "all --grad_accum micro-batches (TRL's per-device size x devices x accumulation).",
    "num_train_epochs": "Whole passes only (an integer).",
    "lr_scheduler_type": "constant | cosine | linear, each after --warmup_steps of linear warmup.",
    "save_total_limit": "The newest checkpoint that passed the guard is kept as well.",
    "model_name_or_path": "A local folder or a preset (no Hub download).",
}


def _kind(tp) -> str:
  """Returns 'bool', 'int', 'float', 'str', 'multi_str' or 'float_list' for a field's type."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
    (inner,) = [a for a in args if a is not type(None)]
    return _kind(inner)
  if typing.get_origin(tp) is tuple:
    return "multi_str" if args[0] is str else "float_list"
  return {bool: "bool", int: "int", float: "float", str: "str"}[tp]


def _kinds(config_cls) -> dict[str, str]:
  hints = typing.get_type_hints(config_cls)
  return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(config_cls)}


def define(config_cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of the dataclass `config_cls` (see module docstring), and the
  TRL aliases of its fields, as flags of the calling module (so that its --helpshort lists them)."""
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  module_name = sys.argv[0] if caller == "__main__" else caller  # absl's own rule for the main module
  kinds = _kinds(config_cls)
  for f in dataclasses.fields(config_cls):
    help_, choices, default = f.metadata.get("help", f.name), f.metadata.get("choices"), f.default
    kind = kinds[f.name]
    kw = dict(name=f.name, help=help_, flag_values=flag_values, module_name=module_name)
    if choices is not None:  # an empty default: no choice made (the config reads it as "")
      flags.DEFINE_enum(default=default or None, enum_values=[c for c in choices if c], **kw)
    elif kind == "bool":
      flags.DEFINE_bool(default=default, **kw)
    elif kind == "int":
      flags.DEFINE_integer(default=default, **kw)
    elif kind == "float":
      flags.DEFINE_float(default=default, **kw)
    elif kind == "multi_str":
      flags.DEFINE_multi_string(default=list(default), **kw)
    elif kind == "float_list":
      flags.DEFINE_list(default=[str(x) for x in default], **kw)
    else:
      flags.DEFINE_string(default=default, **kw)
  for alias, name in TRL_ALIASES.items():
    if name in kinds:
      flags.DEFINE_alias(alias, name, flag_values=flag_values, module_name=module_name)
      note = _ALIAS_NOTES.get(alias)
      flag_values[alias].help = f"Alias for --{name} (TRL's name).{' ' + note if note else ''}"


def from_flags(config_cls, flag_values: flags.FlagValues = flags.FLAGS):
  """Returns config_cls(**the flags' values); RunError names a --list flag that is not numbers."""
  kinds = _kinds(config_cls)
  kw = {}
  for f in dataclasses.fields(config_cls):
    value, kind = flag_values[f.name].value, kinds[f.name]
    if kind == "multi_str":
      value = tuple(value or ())
    elif value is None and f.default == "":
      value = ""
    elif kind == "float_list":
      try:
        value = tuple(float(x) for x in value)
      except ValueError:
        raise options_lib.RunError(f"--{f.name}: {','.join(value)!r} is not a comma-separated list of numbers") from None
    kw[f.name] = value
  return config_cls(**kw)


def given(config_cls, flag_values: flags.FlagValues = flags.FLAGS) -> set[str]:
  """Returns the fields whose flag (or one of its aliases, or a --flagfile line) was given."""
  return {f.name for f in dataclasses.fields(config_cls) if flag_values[f.name].present}


# ---------------------------------------------------------------------------------------------
# The run folder's recorded flags.


def _recorded_value(value: Any, kind: str, optional: bool, where: str, name: str):
  """Returns a config.json value as the field's type; RunError naming the file and field otherwise."""
  ok = {
      "bool": lambda v: isinstance(v, bool),
      "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
      "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
      "str": lambda v: isinstance(v, str),
      "multi_str": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
      "float_list": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                          for x in v),
  }[kind]
  if value is None and optional:
    return None
  if not ok(value):
    raise options_lib.RunError(f"{where}: field {name!r} records {value!r}, not a {kind.replace('_', ' ')} value "
                               f"for --{name}; give --{name} on the command line or fix the file")
  if kind == "multi_str":
    return tuple(value)
  if kind == "float_list":
    return tuple(float(x) for x in value)
  return float(value) if kind == "float" else value


def recorded(config_cls, run_dir: str) -> Optional[dict[str, Any]]:
  """Returns {field: value} of the config_cls fields that RUN/config.json records (None without the
  file); its other keys (the model's architecture, the resolved shapes, ...) are left out."""
  path = os.path.join(run_dir, RECORD)
  if not os.path.isfile(path):
    return None
  saved = model_config_lib.read_json_object(path, options_lib.RunError)
  kinds, hints = _kinds(config_cls), typing.get_type_hints(config_cls)
  optional = lambda name: type(None) in typing.get_args(hints[name])
  return {f.name: _recorded_value(saved[f.name], kinds[f.name], optional(f.name), path, f.name)
          for f in dataclasses.fields(config_cls) if f.name in saved and f.name not in NOT_RECORDED}


def resolve(config_cls, flag_values: flags.FlagValues = flags.FLAGS):
  """Returns (config, taken): the flags' config in which, when --resume and --run_dir holds a
  config.json, every field whose flag was not given takes the recorded value; `taken` holds the
  recorded values that differ from the flags' defaults (what a user did not type but gets)."""
  cfg = from_flags(config_cls, flag_values)
  record = recorded(config_cls, cfg.run_dir) if cfg.resume else None
  if not record:
    return cfg, {}
  typed = given(config_cls, flag_values)
  kw = {k: v for k, v in record.items() if k not in typed}
  defaults = config_cls()
  taken = {k: v for k, v in kw.items() if v != getattr(defaults, k)}
  return dataclasses.replace(cfg, **kw), taken


def as_flag(name: str, value: Any) -> Optional[str]:
  """Returns `value` of field `name` as command-line text (None: a None value, which no flag gives)."""
  if value is None:
    return None
  if isinstance(value, bool):
    return f"--{name}" if value else f"--no{name}"
  if isinstance(value, tuple):
    if value and isinstance(value[0], str):
      return " ".join(f"--{name}={shlex.quote(v)}" for v in value)
    return f"--{name}={','.join(repr(float(v)) for v in value)}"
  return f"--{name}={shlex.quote(str(value))}"


def flags_text(settings: dict[str, Any]) -> str:
  """Returns the settings as flags, e.g. '--batch_size=4 --max_steps=3'."""
  return " ".join(t for t in (as_flag(k, v) for k, v in settings.items()) if t)


def resume_command(module: str, cfg, config_cls, flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """Returns the command that continues the run of `cfg`: `python -m MODULE --run_dir R`, plus the
  given flags whose values differ from the ones RUN/config.json records (those are not replayed)."""
  record = recorded(config_cls, cfg.run_dir) or {}
  extra = {k: getattr(cfg, k) for k in sorted(given(config_cls, flag_values) - {"run_dir", "resume"})
           if k not in record or record[k] != getattr(cfg, k)}
  text = flags_text(extra)
  return f"python -m {module} --run_dir {shlex.quote(cfg.run_dir)}" + (f" {text}" if text else "")


def announce_recorded(cfg, taken: dict[str, Any], say) -> Any:
  """Returns cfg after telling `say` which recorded settings (not given as flags) it uses."""
  if taken:
    say(f"{os.path.join(cfg.run_dir, RECORD)}: flags not given take the recorded values: {flags_text(taken)}")
  return cfg


def start_process(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """What a launcher does first: keeps Orbax's per-save INFO lines off the console unless --verbosity
  is given, and joins a multi-process run when the environment describes one
  (`dreamjax.train.mesh.initialize_distributed`); a bad multi-process environment exits 2 with
  one error line."""
  from absl import logging  # pylint: disable=g-import-not-at-top

  from dreamjax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  if not flag_values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    mesh_lib.initialize_distributed()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
