"""The dream loop: dream triplets with the current model, train a few steps on them, repeat.

    python -m launch.dream                         # embedded default: tiny model, shipped memories, 3 cycles
    python -m launch.dream --model /models/Qwen3-8B --memories mem.jsonl --templates t.jsonl \
        --rules rules.jsonl --cycles 20 --scenarios 256 --run_dir runs/dream1 --lr 1e-6
    python -m launch.dream --flagfile dream1.flags

A run folder that holds checkpoints is resumed at the first unfinished cycle unless --noresume
(a thin main over dreamjax.dream.cycle); flags not given take the values the folder's config.json
records, so `python -m launch.dream --run_dir R` continues R. Ctrl-C (or SIGTERM) stops between
two generation chunks (or completes the cycle's few training steps), saves, prints the command
that resumes and exits 0; a second Ctrl-C ends the process at once. TRL's flag names
(--learning_rate, --output_dir, ...) are aliases of the project's (see --helpfull).
"""

import json
import sys

from absl import app, flags

from dreamjax.data import jsonl
from dreamjax.dream import cycle
from dreamjax.dream.scorer import ScorerError
from dreamjax.model import ConfigError
from dreamjax.model.hf import ModelFileError
from dreamjax.train import checkpoint as ckpt_lib
from launch import flags as launch_flags

launch_flags.define(cycle.CycleConfig)

FLAGS = flags.FLAGS
_ERRORS = (cycle.RunError, jsonl.DataError, ConfigError, ModelFileError, ckpt_lib.CheckpointError, ScorerError)


def say(message: str) -> None:
  """Prints a progress line on stderr (where the progress bar is)."""
  print(message, file=sys.stderr, flush=True)


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
  launch_flags.start_process()  # quiet Orbax logs; join a multi-process run if the environment says so
  try:
    cfg = launch_flags.announce_recorded(*launch_flags.resolve(cycle.CycleConfig), say)
    summary = cycle.run(cfg, on_cycle=_print_cycle, progress=say)
  except _ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # Ctrl-C before the first cycle started: nothing to save
    say("interrupted before the first cycle; nothing was trained")
    sys.exit(130)
  if summary.get("nothing_to_do"):
    say(f"finished at cycle {summary['cycles_done']} (step {summary['step']}); nothing to do (summary: "
        f"{summary['paths']['run_dir']}/summary.json)")
    sys.exit(0)
  print(json.dumps({k: summary[k] for k in ("status", "cycles_done", "step", "kept", "kept_per_kind", "seconds",
                                             "paths")}, indent=1))
  if summary["status"].startswith("preempted"):
    say(f"stopped with {summary['cycles_done']} of {summary['cycles']} cycles done; to resume: "
        f"{launch_flags.resume_command('launch.dream', cfg, cycle.CycleConfig)}")
  sys.exit(0 if summary["status"].startswith(("finished", "preempted")) else 3)


if __name__ == "__main__":
  app.run(main)
