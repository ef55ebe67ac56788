"""Completions of prompts by a model folder, a tiny preset or a run's checkpoint, as JSON lines.

`run(GenerateConfig(...), out)` is what `python -m launch.generate` calls. The model is one of

    model=FOLDER      a local Hugging Face folder (weights, config.json, its tokenizer)
    model=PRESET      a tiny preset: random init from `seed`, as `launch.train` starts it; built-in tokenizer
    run_dir=RUN       a run folder's checkpoint `step` (default: the newest), read-only; the tokenizer
                      of the run's --model folder, or the built-in one for a preset run

Prompts are strings or chat messages [{role, content}, ...] (TRL's conversational format); chat
prompts are rendered with the tokenizer's chat template and its generation prompt, and `chat`
turns plain strings into one user message when there is a template. A row stops at a stop token
(the model config's eos ids and the tokenizer's eos token, e.g. Qwen's end of turn <|im_end|>) or
after `max_new_tokens`. Each prompt gives one line:

    {"prompt": <as given>, "completion": str, "tokens": n, "finish_reason": "stop" | "length"}

where `tokens` counts the completion's tokens (the stop token is not part of it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, TextIO

import jax
import numpy as np

from dreamjax.data import jsonl
from dreamjax.data import tokenize as tok_lib
from dreamjax.model import ModelConfig
from dreamjax.model.sample import generate
from dreamjax.train import options as options_lib
from dreamjax.train import run_params
from dreamjax.train import session as session_lib

FINISH_STOP, FINISH_LENGTH = "stop", "length"


class GenerateError(ValueError):
  """A bad setting or input; the message names the flag, file or field."""


@dataclasses.dataclass
class GenerateConfig:
  """Every setting of a generation (the absl flags of launch/generate.py, one to one)."""

  model: Optional[str] = None  # a local HF folder or a tiny preset; exclusive with run_dir
  run_dir: Optional[str] = None  # a run folder (or its checkpoints/): the params of a checkpoint step
  step: Optional[int] = None  # with run_dir: the checkpoint step (None: the newest)
  prompt: tuple[str, ...] = ()  # prompt texts (--prompt, repeatable)
  prompts: Optional[str] = None  # JSONL file, one {"prompt": string | [{role, content}, ...]} per line
  chat: bool = False  # plain-string prompts become one user message of the chat template
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0  # nucleus sampling mass
  max_new_tokens: int = 128  # longest completion (tokens, stop token included)
  seed: int = 0  # sampling key; a preset's random init
  batch_size: int = 8  # prompts per generate call (the last batch is padded: one compilation)
  output: Optional[str] = None  # JSONL file to write (None: the `out` stream, stdout from the launcher)
  overwrite: bool = False  # allow replacing an existing output file


def validate(cfg: GenerateConfig) -> None:
  """Raises GenerateError naming the flag of the first bad setting."""
  if (cfg.model is None) == (cfg.run_dir is None):
    raise GenerateError("give exactly one of --model (a model folder or preset) and --run_dir (a training run)"
                        + ("" if cfg.model is None else f"; got --model {cfg.model} and --run_dir {cfg.run_dir}"))
  if cfg.step is not None and cfg.run_dir is None:
    raise GenerateError("--step picks a checkpoint of --run_dir; it needs --run_dir")
  if cfg.step is not None and cfg.step < 0:
    raise GenerateError(f"--step: must be >= 0, got {cfg.step}")
  if not cfg.prompt and not cfg.prompts:
    raise GenerateError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
  if not cfg.temperature >= 0:
    raise GenerateError(f"--temperature: must be >= 0 (0: greedy), got {cfg.temperature}")
  if not 0 < cfg.top_p <= 1:
    raise GenerateError(f"--top_p: must be in (0, 1], got {cfg.top_p}")
  for name in ("max_new_tokens", "batch_size"):
    if getattr(cfg, name) < 1:
      raise GenerateError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
  if cfg.output and os.path.exists(cfg.output) and not cfg.overwrite:
    raise GenerateError(f"--output {cfg.output} exists; choose a new file or pass --overwrite")
  if cfg.output and os.path.isdir(cfg.output):
    raise GenerateError(f"--output {cfg.output} is a directory; expected a JSONL file path")


# ---------------------------------------------------------------------------------------------
# The model.


class Model(NamedTuple):
  """A model ready to sample from."""

  config: ModelConfig
  params: dict
  tokenizer: tok_lib.TextTokenizer
  description: str  # what was loaded, for the info line


def load_model(cfg: GenerateConfig) -> Model:
  """Returns the model of --model or --run_dir (see the module docstring)."""
  if cfg.run_dir is not None:
    if not os.path.isdir(cfg.run_dir):
      raise GenerateError(f"--run_dir {cfg.run_dir}: no such folder (expected a training run folder)")
    run = run_params.restore(cfg.run_dir, cfg.step)
    if run.tokenizer_folder is None:
      raise GenerateError(f"--run_dir {cfg.run_dir}: the run config names no --model, so there is no tokenizer")
    if not os.path.isdir(run.tokenizer_folder):
      raise GenerateError(f"--run_dir {cfg.run_dir}: the run's model folder {run.tokenizer_folder} (run config "
                          "field 'model') is not there; its tokenizer is read from it")
    tokenizer = tok_lib.TextTokenizer.from_folder(run.tokenizer_folder)
    config, params = run.config, run.params
    description = f"run {cfg.run_dir}, checkpoint step {run.step} of {run.checkpoint_dir} (model {run.model})"
  else:
    try:
      m = session_lib.load_model(options_lib.TrainOptions(model=cfg.model, seed=cfg.seed))
    except options_lib.RunError as e:
      raise GenerateError(str(e)) from None
    config, params, tokenizer = m.config, m.params, m.tokenizer
    description = (f"preset {cfg.model} (random init, seed {cfg.seed})" if m.is_preset
                   else f"model folder {cfg.model}")
  try:
    session_lib.check_vocab(config, tokenizer)
  except options_lib.RunError as e:
    raise GenerateError(str(e)) from None
  return Model(config, params, tokenizer, description)


def stop_tokens(config: ModelConfig, tokenizer: tok_lib.TextTokenizer) -> tuple[int, ...]:
  """Returns the ids a completion stops at: the config's eos ids, then the tokenizer's eos token."""
  ids = list(config.eos_token_ids) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
  return tuple(dict.fromkeys(ids))


# ---------------------------------------------------------------------------------------------
# Prompts.


class Prompt(NamedTuple):
  """One prompt: as given, its token ids, and where it came from."""

  prompt: jsonl.Turns  # the string or message list as given (echoed in the output)
  ids: list[int]  # what the model continues
  where: str  # "--prompt #i" or "file:line"


def read_prompts_file(path: str) -> list[tuple[jsonl.Turns, str]]:
  """Returns (prompt, "file:line") per line of a JSONL file of {"prompt": ...} objects.

  A line's other fields (e.g. a preference file's chosen/rejected) are ignored. DataError names
  the file, the line and the field of a bad line.
  """
  out = []
  for where, obj in jsonl.read_objects(path):
    if not isinstance(obj, dict):
      raise jsonl.DataError(f"{where}: expected a JSON object with a 'prompt' field; got {type(obj).__name__}")
    if "prompt" not in obj:
      raise jsonl.DataError(f"{where}: missing field 'prompt'; expected {{\"prompt\": string or "
                            "[{role, content}, ...]}")
    prompt = jsonl.check_turns(obj["prompt"], where, "prompt")
    if isinstance(prompt, str) and not prompt:
      raise jsonl.DataError(f"{where}: field 'prompt' is empty")
    out.append((prompt, where))
  if not out:
    raise jsonl.DataError(f"{path}: no prompts (the file is empty)")
  return out


def encode_prompts(items: Sequence[tuple[jsonl.Turns, str]], tokenizer: tok_lib.TextTokenizer,
                   chat: bool = False) -> list[Prompt]:
  """Returns the prompts tokenised: message lists through the chat template (with its generation
  prompt); strings as they are, or as one user message when `chat` and the tokenizer has a template."""
  out = []
  for prompt, where in items:
    messages = prompt if not isinstance(prompt, str) else (
        [{"role": "user", "content": prompt}] if chat and tokenizer.chat_template else None)
    text = prompt if messages is None else tokenizer.render_chat(list(messages), add_generation_prompt=True,
                                                                  where=where)
    ids = tokenizer.encode(text)
    if not ids:
      raise jsonl.DataError(f"{where}: the prompt tokenises to no tokens; the first completion token needs a context")
    out.append(Prompt(prompt, ids, where))
  return out


def gather_prompts(cfg: GenerateConfig) -> list[tuple[jsonl.Turns, str]]:
  """Returns (prompt, where) of --prompt (in order) and then of the --prompts file."""
  items = []
  for i, text in enumerate(cfg.prompt):
    if not text:
      raise GenerateError(f"--prompt #{i + 1} is empty")
    items.append((text, f"--prompt #{i + 1}"))
  return items + (read_prompts_file(cfg.prompts) if cfg.prompts else [])


# ---------------------------------------------------------------------------------------------
# Completion.


def complete(model: Model, prompts: Sequence[Prompt], cfg: GenerateConfig) -> Iterator[dict[str, Any]]:
  """Yields one output record per prompt, in order (batch by batch).

  Every call of the jitted generate has `batch_size` rows (a short last batch repeats its last
  prompt), so prompt batches of similar length share one compilation. Batch k samples with
  fold_in(PRNGKey(seed), k).
  """
  stops = stop_tokens(model.config, model.tokenizer)
  key = jax.random.PRNGKey(cfg.seed)
  for k, at in enumerate(range(0, len(prompts), cfg.batch_size)):
    chunk = list(prompts[at:at + cfg.batch_size])
    padded = chunk + [chunk[-1]] * (cfg.batch_size - len(chunk))
    gen = generate(model.params, model.config, [p.ids for p in padded], cfg.max_new_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, key=jax.random.fold_in(key, k),
                   stop_tokens=stops or None)
    tokens_BxN, lengths_B = np.asarray(gen.tokens_BxN), np.asarray(gen.lengths_B)
    for r, p in enumerate(chunk):
      out = tokens_BxN[r, :lengths_B[r]].tolist()
      stopped = bool(out) and out[-1] in stops
      out = out[:-1] if stopped else out
      yield {"prompt": p.prompt, "completion": model.tokenizer.decode(out) if out else "", "tokens": len(out),
             "finish_reason": FINISH_STOP if stopped else FINISH_LENGTH}


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def run(cfg: GenerateConfig, out: Optional[TextIO] = None, info: Callable[[str], None] = _stderr) -> int:
  """Writes one JSON line per prompt to cfg.output (or `out`, default stdout); returns how many.

  Everything is checked before the output file is created: flags, the prompts file, the model and
  every prompt's tokenisation. Raises GenerateError, DataError, ConfigError or ModelFileError
  (the model's files) naming what is wrong.
  """
  validate(cfg)
  items = gather_prompts(cfg)
  model = load_model(cfg)
  if cfg.chat and not model.tokenizer.chat_template:
    info(f"generate: --chat: {model.tokenizer.source} has no chat template; plain prompts are used as text")
  prompts = encode_prompts(items, model.tokenizer, cfg.chat)
  stops = stop_tokens(model.config, model.tokenizer)
  info(f"generate: {model.description}; tokenizer {model.tokenizer.source}; {len(prompts)} prompt(s), "
       f"{'greedy' if cfg.temperature == 0 else f'temperature {cfg.temperature}, top_p {cfg.top_p}'}, "
       f"max_new_tokens {cfg.max_new_tokens}, stop ids {list(stops)}"
       + (f" -> {cfg.output}" if cfg.output else ""))
  if cfg.output:
    try:
      stream = open(cfg.output, "w" if cfg.overwrite else "x", encoding="utf-8")
    except FileExistsError:
      raise GenerateError(f"--output {cfg.output} exists; choose a new file or pass --overwrite") from None
    except OSError as e:
      raise GenerateError(f"--output {cfg.output}: cannot be written: {e.strerror or e}") from None
  else:
    stream = out if out is not None else sys.stdout
  n = 0
  try:
    for record in complete(model, prompts, cfg):
      stream.write(json.dumps(record, ensure_ascii=False) + "\n")
      stream.flush()
      n += 1
  finally:
    if cfg.output:
      stream.close()
  return n

