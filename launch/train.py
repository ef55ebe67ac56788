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
from dreamjax.model.hf import ModelFileError
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import loop
from launch import flags as launch_flags

launch_flags.define(loop.RunConfig)

FLAGS = flags.FLAGS
_ERRORS = (loop.RunError, jsonl.DataError, ConfigError, ModelFileError, ckpt_lib.CheckpointError)


def config_from_flags() -> loop.RunConfig:
  return launch_flags.from_flags(loop.RunConfig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console to the bar
    logging.set_verbosity(logging.WARNING)
  try:
    mesh_lib.initialize_distributed()  # several processes (JAX_COORDINATOR_ADDRESS, ...) or a no-op
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    summary = loop.run(config_from_flags())
  except _ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: summary[k] for k in ("status", "steps", "seconds", "last_metrics", "paths")}, indent=1))
  sys.exit(0 if summary["status"].startswith(("finished", "preempted")) else 3)


if __name__ == "__main__":
  app.run(main)
