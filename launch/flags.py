"""absl flags made from a config dataclass: one flag per field, with the field's help and choices.

Both launchers call `define(ConfigClass)` and `from_flags(ConfigClass)`; the fields (and their
help) are defined once, in `dreamjax.train.options.TrainOptions` and the drivers' subclasses.
A field typed `tuple[str, ...]` is a repeatable string flag, `tuple[float, ...]` a comma-separated
list, `Optional[float]` a float flag whose default is None.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from absl import flags

from dreamjax.train import options as options_lib


def _kind(tp) -> str:
  """Returns 'bool', 'int', 'float', 'str', 'multi_str' or 'float_list' for a field's type."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
    (inner,) = [a for a in args if a is not type(None)]
    return _kind(inner)
  if typing.get_origin(tp) is tuple:
    return "multi_str" if args[0] is str else "float_list"
  return {bool: "bool", int: "int", float: "float", str: "str"}[tp]


def define(config_cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of the dataclass `config_cls` (see module docstring), as flags
  of the calling module (so that its --helpshort lists them)."""
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  module_name = sys.argv[0] if caller == "__main__" else caller  # absl's own rule for the main module
  hints = typing.get_type_hints(config_cls)
  for f in dataclasses.fields(config_cls):
    help_, choices, default = f.metadata.get("help", f.name), f.metadata.get("choices"), f.default
    kind = _kind(hints[f.name])
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


def from_flags(config_cls, flag_values: flags.FlagValues = flags.FLAGS):
  """Returns config_cls(**the flags' values); RunError names a --list flag that is not numbers."""
  hints = typing.get_type_hints(config_cls)
  kw = {}
  for f in dataclasses.fields(config_cls):
    value, kind = flag_values[f.name].value, _kind(hints[f.name])
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
