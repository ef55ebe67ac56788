"""A run checkpoint's params and model config, restored without knowing the run's optimizer.

`RUN/checkpoints/<step>/state` holds the whole train state, whose optimizer part has a structure
that depends on the run's flags; restoring it without a target (Orbax rebuilds the saved tree)
needs none of them. The model config is the `model_config` of the run config saved with the step
(its architecture fields; implementation fields such as attention_impl take their defaults).

Reading is read-only: steps are listed from the folder (no CheckpointManager, which would create a
missing folder and clean up the temporary folder of a save in progress), so a run that is still
training can be read. Used by `launch.convert --to hf` and `launch.generate --run_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

from dreamjax.data import builtin
from dreamjax.model import ModelConfig
from dreamjax.model import config as model_config_lib
from dreamjax.model import layout
from dreamjax.train import checkpoint as ckpt_lib


class RunParams(NamedTuple):
  """The params of one checkpoint step of a run, with what is needed to use them."""

  config: ModelConfig  # from the step's run config 'model_config'
  params: dict  # the stacked layout (a per-layer checkpoint is restacked)
  step: int  # the checkpoint step restored
  run_config: dict  # the run config saved with the step (JSON: tuples as lists)
  checkpoint_dir: str  # the folder holding the steps

  @property
  def model(self) -> str:
    """The run's --model: a local HF folder or a preset name ('' when the run config has none)."""
    return self.run_config.get("model") or ""

  @property
  def model_folder(self) -> Optional[str]:
    """The run's base model folder (None for a preset run)."""
    return None if self.model in model_config_lib.PRESETS or not self.model else self.model

  @property
  def tokenizer_folder(self) -> Optional[str]:
    """Where the run's tokenizer is: the built-in one for a preset, else the model folder."""
    return builtin.TOKENIZER if self.model in model_config_lib.PRESETS else self.model_folder


def model_config_from_dict(d: dict) -> ModelConfig:
  """Returns the ModelConfig of a JSON dict of its fields (unknown keys ignored, lists as tuples)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
  return ModelConfig(**kw)


class _DropStepMetadataWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _no_step_metadata_warning():
  """Drops Orbax's "Metadata file does not exist" warning while an item folder is read on its own:
  the step-level metadata it looks for sits one folder up and is not needed to read the arrays."""
  logger, drop = logging.getLogger("absl"), _DropStepMetadataWarning()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def restore_raw(path: str):
  """Returns the pytree of an Orbax StandardSave folder, every array on this process's first device.

  The target comes from the checkpoint's own metadata (no optimizer or model needed), placed on
  one local device: a checkpoint written by 8 devices (or several processes) reads on a laptop.
  """
  try:
    with _no_step_metadata_warning(), ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(os.path.abspath(path))
      meta = getattr(meta, "item_metadata", meta)
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
      return ckptr.restore(os.path.abspath(path), target)
  except Exception as e:  # pylint: disable=broad-except
    reason = ckpt_lib._short(e)  # pylint: disable=protected-access
    raise ckpt_lib.CheckpointError(f"{path}: unreadable ({reason})") from None


def checkpoint_dir(src: str) -> str:
  """Returns the folder of a run's steps: src/checkpoints when present, else src itself."""
  sub = os.path.join(src, "checkpoints")
  return sub if os.path.isdir(sub) else src


def saved_steps(directory: str) -> list[int]:
  """Returns the finished checkpoint steps in `directory`, oldest first (read-only)."""
  if not os.path.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(os.path.abspath(directory)))


def restore(src: str, step: Optional[int] = None) -> RunParams:
  """Returns the params of checkpoint `step` (default: the newest) of a run folder or its checkpoints/.

  Raises CheckpointError naming the folder when there is no such step or it cannot be read.
  """
  if not os.path.isdir(src):
    raise ckpt_lib.CheckpointError(f"{src}: no such folder (expected a run folder or its checkpoints/)")
  directory = checkpoint_dir(src)
  steps = saved_steps(directory)
  if not steps:
    raise ckpt_lib.CheckpointError(f"{src}: no Orbax checkpoint steps found (expected a run folder or its "
                                   "checkpoints/)")
  used = steps[-1] if step is None else int(step)
  if used not in steps:
    raise ckpt_lib.CheckpointError(f"--step {used}: not among the checkpoint steps {steps} in {directory}")
  step_dir = os.path.join(directory, str(used))
  state = restore_raw(os.path.join(step_dir, ckpt_lib.STATE))
  metadata = os.path.join(step_dir, ckpt_lib.CONFIG, "metadata")  # Orbax JsonSave: plain JSON
  try:
    with open(metadata, encoding="utf-8") as f:
      run_config = json.load(f)
  except (OSError, ValueError) as e:
    raise ckpt_lib.CheckpointError(f"{metadata}: the step's run config is unreadable ({e})") from None
  if not isinstance(run_config, dict) or not isinstance(run_config.get("model_config"), dict):
    raise ckpt_lib.CheckpointError(f"{step_dir}: run config has no model_config; was it written by launch.train?")
  if not isinstance(state, dict) or "params" not in state:
    raise ckpt_lib.CheckpointError(f"{step_dir}/{ckpt_lib.STATE}: no 'params' in the saved train state")
  config = model_config_from_dict(run_config["model_config"])
  params = layout.from_per_layer(state["params"], config)
  return RunParams(config, params, used, run_config, directory)
