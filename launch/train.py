"""Main job: trains a model on preference data (absl flags; a thin main over dreamjax.train.loop).

    python -m launch.train                      # the embedded default: tiny model, built-in data
    python -m launch.train --model /models/Qwen3-8B --data prefs.jsonl --general_data web.jsonl \
        --run_dir runs/exp1 --mesh 1,8 --optimizer apollo_mini --lr 1e-5
    python -m launch.train --flagfile exp1.flags
    python -m launch.train --run_dir runs/exp1  # continue it: the flags RUN/config.json records

A run folder that holds checkpoints is resumed (exactly) unless --noresume; flags not given take
the values the folder's config.json records. Ctrl-C (or SIGTERM) finishes the step, saves, prints
the command that resumes and exits 0; a second Ctrl-C ends the process at once. TRL's flag names
(--learning_rate, --output_dir, ...) are aliases of the project's (see --helpfull).
"""

import json
import sys

from absl import app, flags

from dreamjax.data import jsonl
from dreamjax.model import ConfigError
from dreamjax.model.hf import ModelFileError
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import loop
from launch import flags as launch_flags

launch_flags.define(loop.RunConfig)

FLAGS = flags.FLAGS
_ERRORS = (loop.RunError, jsonl.DataError, ConfigError, ModelFileError, ckpt_lib.CheckpointError)


def say(message: str) -> None:
  """Prints a progress line on stderr (where the progress bar is)."""
  print(message, file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch_flags.start_process()  # quiet Orbax logs; join a multi-process run if the environment says so
  try:
    cfg = launch_flags.announce_recorded(*launch_flags.resolve(loop.RunConfig), say)
    summary = loop.run(cfg, progress=say)
  except _ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save
    say("interrupted before the first step; nothing was trained")
    sys.exit(130)
  if summary.get("nothing_to_do"):
    say(f"finished at step {summary['steps']}; nothing to do (summary: {summary['paths']['run_dir']}/summary.json)")
    sys.exit(0)
  print(json.dumps({k: summary[k] for k in ("status", "steps", "seconds", "last_metrics", "paths")}, indent=1))
  if summary["status"].startswith("preempted"):
    say(f"stopped at step {summary['steps']} of {summary['total_steps']}; to resume: "
        f"{launch_flags.resume_command('launch.train', cfg, loop.RunConfig)}")
  sys.exit(0 if summary["status"].startswith(("finished", "preempted")) else 3)


if __name__ == "__main__":
  app.run(main)
