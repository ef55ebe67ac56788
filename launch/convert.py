"""Converts between Hugging Face model folders and Orbax checkpoints.

    # HF folder -> Orbax params checkpoint (plus config.json and the tokenizer files beside it)
    python -m launch.convert --to orbax --src /models/Qwen3-8B --dst /ckpt/qwen3-8b
    # a run's checkpoint (newest, or --step) -> HF folder loadable by transformers
    python -m launch.convert --to hf --src runs/exp1 [--step 1200] --dst /models/exp1-step1200
    # ... with tensors of another dtype (default: the source model's, e.g. bfloat16 for Qwen3)
    python -m launch.convert --to hf --src runs/exp1 --dtype float32 --dst /models/exp1-f32
    # an Orbax params checkpoint made by --to orbax -> HF folder
    python -m launch.convert --to hf --src /ckpt/qwen3-8b --dst /models/qwen3-8b-again

The destination must not exist (nothing is overwritten).
"""

import os
import shutil
import sys

from absl import app, flags, logging
import numpy as np
import orbax.checkpoint as ocp

from dreamjax.model import ConfigError, ModelConfig, hf
from dreamjax.model import layout
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import run_params

SOURCE = "source"  # --dtype: keep the source model's parameter dtype
_TO = flags.DEFINE_enum("to", None, ["orbax", "hf"], "Direction: HF folder -> Orbax, or Orbax -> HF folder.")
_SRC = flags.DEFINE_string("src", None, "Source: an HF folder (--to orbax); a run folder, its checkpoints/ "
                           "folder, or a --to orbax output (--to hf).")
_DST = flags.DEFINE_string("dst", None, "Destination folder (must not exist).")
_STEP = flags.DEFINE_integer("step", None, "--to hf from a run: the checkpoint step (default: newest).")
_DTYPE = flags.DEFINE_enum("dtype", SOURCE, (SOURCE,) + hf.EXPORT_DTYPES,
                           "--to hf: dtype of the written tensors, recorded in config.json. 'source': the dtype "
                           "the source model's config.json declares (a run: its --model folder), else that of "
                           "the stored params (float32 for presets).")
flags.mark_flags_as_required(["to", "src", "dst"])

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
PARAMS_DIR = "params"  # --to orbax: DST/params holds the Orbax params checkpoint


class ConvertError(ValueError):
  pass


def _copy_tokenizer(src_folder: str, dst: str) -> None:
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src_folder, name)):
      shutil.copy2(os.path.join(src_folder, name), os.path.join(dst, name))


def hf_to_orbax(src: str, dst: str) -> None:
  """DST/params (Orbax, the params pytree) + DST/config.json + the tokenizer files."""
  config, params = hf.load(src)
  os.makedirs(dst)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(dst, PARAMS_DIR)), params)
    ckptr.wait_until_finished()
  shutil.copy2(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
  _copy_tokenizer(src, dst)


def source_dtype(model_folder: str | None, params) -> str:
  """Returns the dtype `--dtype source` exports: what model_folder's config.json declares, else the params'.

  Training loads any source in float32, so the stored params do not remember a bfloat16 source; its
  config.json ('dtype', or the older 'torch_dtype') does.
  """
  path = os.path.join(model_folder, "config.json") if model_folder else None
  declared = hf.declared_dtype(model_folder) if path and os.path.isfile(path) else None
  if declared is not None:
    if declared not in hf.EXPORT_DTYPES:
      raise ConvertError(f"--dtype source: {path} declares {declared!r}, not one of {', '.join(hf.EXPORT_DTYPES)}; "
                         "pass --dtype")
    return declared
  stored = np.dtype(params["embed"].dtype).name
  if model_folder:
    logging.warning("--dtype source: %s declares no dtype; writing the stored params' %s",
                    path if os.path.isfile(path) else f"{model_folder} (not found)", stored)
  if stored not in hf.EXPORT_DTYPES:
    raise ConvertError(f"--dtype source: the stored params are {stored}, not one of {', '.join(hf.EXPORT_DTYPES)}; "
                       "pass --dtype")
  return stored


def orbax_to_hf(src: str, dst: str, step=None, dtype: str = SOURCE) -> int | None:
  """Writes an HF folder from a --to orbax output or a run's checkpoint; returns the step used.

  Args:
    dtype: the written tensors' dtype, one of hf.EXPORT_DTYPES, or 'source' (see source_dtype).
  """
  if dtype != SOURCE and dtype not in hf.EXPORT_DTYPES:
    raise ConvertError(f"--dtype {dtype!r}: expected {SOURCE} or one of {', '.join(hf.EXPORT_DTYPES)}")
  if os.path.exists(dst):
    raise ConvertError(f"--dst {dst} exists; choose a new folder (nothing is overwritten)")
  if os.path.isdir(os.path.join(src, PARAMS_DIR)):  # a --to orbax output
    config = ModelConfig.from_hf(src)
    params, tok_src, used, model_folder = run_params.restore_raw(os.path.join(src, PARAMS_DIR)), src, None, src
  else:
    run = run_params.restore(src, step)
    config, params, used = run.config, run.params, run.step
    tok_src, model_folder = run.tokenizer_folder, run.model_folder
  if dtype == SOURCE:
    dtype = source_dtype(model_folder, params)
  hf.save_hf(dst, layout.from_per_layer(params, config), config, dtype=dtype)  # checkpoints of either layout
  if tok_src and os.path.isdir(tok_src):
    _copy_tokenizer(tok_src, dst)
  return used


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs each restore at INFO; keep the console to the result
    logging.set_verbosity(logging.WARNING)
  if os.path.exists(_DST.value):
    print(f"error: --dst {_DST.value} exists; choose a new folder (nothing is overwritten)", file=sys.stderr)
    sys.exit(2)
  if _TO.value == "orbax" and _DTYPE.value != SOURCE:
    print("error: --dtype applies to --to hf (an Orbax params checkpoint is written in float32)", file=sys.stderr)
    sys.exit(2)
  try:
    if _TO.value == "orbax":
      hf_to_orbax(_SRC.value, _DST.value)
      print(f"wrote {os.path.join(_DST.value, PARAMS_DIR)} (Orbax) and config.json")
    else:
      used = orbax_to_hf(_SRC.value, _DST.value, _STEP.value, _DTYPE.value)
      print(f"wrote HF folder {_DST.value}" + (f" from checkpoint step {used}" if used is not None else ""))
  except (ConvertError, ConfigError, hf.ModelFileError, ckpt_lib.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
