"""Completions of prompts as JSON lines (absl flags; a thin main over dreamjax.generate).

    python -m launch.generate --model qwen3-tiny --prompt "The cat"          # preset: random init
    python -m launch.generate --model /models/Qwen3-8B --chat --prompt "Hi!" --max_new_tokens 256
    python -m launch.generate --run_dir runs/exp1 [--step 1200] --prompts prompts.jsonl \
        --temperature 0.7 --top_p 0.9 --output completions.jsonl

One line per prompt, {"prompt", "completion", "tokens", "finish_reason": "stop" | "length"}, to
stdout or --output (never overwritten without --overwrite); what was loaded goes to stderr.
"""

import sys

from absl import app, flags, logging

from dreamjax import generate
from dreamjax.data import jsonl
from dreamjax.model import ConfigError
from dreamjax.model.hf import ModelFileError
from dreamjax.train import checkpoint as ckpt_lib

_D = generate.GenerateConfig()
F = flags
F.DEFINE_string("model", None, "Local HF model folder, or a tiny preset (qwen3-tiny | qwen3_5-tiny: random "
                "init from --seed, built-in tokenizer).")
F.DEFINE_string("run_dir", None, "A training run folder (or its checkpoints/): generate with a checkpoint's "
                "params and the run's tokenizer. Exclusive with --model.")
F.DEFINE_integer("step", None, "With --run_dir: the checkpoint step (default: the newest).")
F.DEFINE_multi_string("prompt", [], "A prompt text; repeatable.")
F.DEFINE_string("prompts", None, "JSONL file of {\"prompt\": string or [{role, content}, ...]} lines (TRL format).")
F.DEFINE_bool("chat", _D.chat, "Send plain-string prompts as one user message through the chat template.")
F.DEFINE_float("temperature", _D.temperature, "Sampling temperature (0: greedy).")
F.DEFINE_float("top_p", _D.top_p, "Nucleus sampling mass, in (0, 1].")
F.DEFINE_integer("max_new_tokens", _D.max_new_tokens, "Longest completion (tokens).")
F.DEFINE_integer("seed", _D.seed, "Sampling seed (and a preset's random init).")
F.DEFINE_integer("batch_size", _D.batch_size, "Prompts per generate call.")
F.DEFINE_string("output", None, "Write the JSON lines to this file instead of stdout.")
F.DEFINE_bool("overwrite", _D.overwrite, "Allow --output to replace an existing file.")

FLAGS = flags.FLAGS
_ERRORS = (generate.GenerateError, jsonl.DataError, ConfigError, ModelFileError, ckpt_lib.CheckpointError)


def config_from_flags() -> generate.GenerateConfig:
  kw = {f.name: FLAGS[f.name].value for f in generate.dataclasses.fields(generate.GenerateConfig)}
  kw["prompt"] = tuple(kw["prompt"])
  return generate.GenerateConfig(**kw)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; prompts go in --prompt TEXT", file=sys.stderr)
    sys.exit(2)
  if not FLAGS["verbosity"].present:  # Orbax logs its restores at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    generate.run(config_from_flags())
  except _ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
