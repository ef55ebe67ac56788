"""dreamjax.generate / launch.generate: greedy output against an uncached argmax loop, run checkpoints,
chat prompts, bad inputs named by file:line, and an output file that is never overwritten."""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import generate as gen
from dreamjax.data import builtin, jsonl
from dreamjax.data import tokenize as tok_lib
from dreamjax.model import ModelConfig, forward, hf, init_params
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import run_params
from dreamjax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Odd sizes (47, 89) so a transposed tensor cannot pass for the right one; the built-in tokenizer's vocab.
CONFIG = ModelConfig.preset("qwen3-tiny").replace(hidden_size=47, intermediate_size=89)
N = 7  # max_new_tokens of every test (one compiled generate per prompt-length bucket)
PROMPTS = ("The cat", "A fox in the barn", "Hi")  # 3 prompts, batch 2: a padded last batch


def write_model(folder, params, config):
  """Writes an HF folder (weights, config.json) with the built-in tokenizer (its chat template, eos <|im_end|>)."""
  hf.save_hf(str(folder), params, config)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy2(os.path.join(builtin.TOKENIZER, name), os.path.join(folder, name))


@jax.jit
def _logits(params, tokens_1xT, mask_1xT):
  positions = jnp.arange(tokens_1xT.shape[1])[None]
  return forward(params, tokens_1xT, positions, mask_1xT, config=CONFIG).logits[0]


def argmax_loop(params, ids, n, width=48):
  """Returns n greedy tokens by whole-sequence forwards (no cache, no prefill, no padding in front)."""
  toks = list(ids)
  for _ in range(n):
    buf, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    buf[0, :len(toks)], mask[0, :len(toks)] = toks, 1  # right pads: invisible to earlier tokens (causal)
    logits = np.asarray(_logits(params, buf, mask)[len(toks) - 1])
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-4, "near-tie: greedy is ill-defined here; change the seed"
    toks.append(int(np.argmax(logits)))
  return toks[len(ids):]


def expected(tok, ref, stops):
  """Returns the record of a greedy completion `ref` (un-stopped) cut at the first stop token."""
  cut = next((i for i, t in enumerate(ref) if t in stops), None)
  out = ref if cut is None else ref[:cut]
  return {"completion": tok.decode(out), "tokens": len(out), "finish_reason": "length" if cut is None else "stop"}


@pytest.fixture(scope="module")
def tok():
  return tok_lib.TextTokenizer.from_folder(builtin.TOKENIZER)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tok):
  """(folder, params, refs): an odd-size model whose config's eos is a token greedy emits mid-way."""
  params = init_params(CONFIG, jax.random.PRNGKey(5), std=0.3)  # peaked logits: no greedy near-ties
  refs = [argmax_loop(params, tok.encode(p), N) for p in PROMPTS]
  # The config's eos: the 4th greedy token of prompt 0 (new there), so that row finishes by 'stop'.
  stop_at = next(i for i in range(3, N) if refs[0][i] not in refs[0][:i] and refs[0][i] != tok.eos_id)
  folder = tmp_path_factory.mktemp("model")
  write_model(folder, params, CONFIG.replace(eos_token_ids=(refs[0][stop_at],)))
  return str(folder), params, refs


def run(**kw):
  """Returns the records of gen.run with the test defaults (batch 2, N tokens, greedy)."""
  out = io.StringIO()
  cfg = gen.GenerateConfig(**{"max_new_tokens": N, "batch_size": 2, **kw})
  gen.run(cfg, out, info=lambda line: None)
  return [json.loads(line) for line in out.getvalue().splitlines()]


def test_greedy_equals_an_uncached_argmax_loop(model, tok):
  folder, _, refs = model
  config = ModelConfig.from_hf(folder)
  stops = gen.stop_tokens(config, tok)
  assert stops == (config.eos_token_ids[0], tok.eos_id)  # the config's eos, then the tokenizer's end of turn
  records = run(model=folder, prompt=PROMPTS)
  assert [r["prompt"] for r in records] == list(PROMPTS)
  assert [{k: r[k] for k in ("completion", "tokens", "finish_reason")} for r in records] == [
      expected(tok, ref, stops) for ref in refs]
  assert records[0]["finish_reason"] == "stop" and records[0]["tokens"] >= 3
  assert any(r["finish_reason"] == "length" and r["tokens"] == N for r in records)


def test_run_dir_generates_with_the_checkpoint_params(model, tok, tmp_path):
  folder, base_params, _ = model
  config = ModelConfig.from_hf(folder)
  run_config = {"model": folder, "model_config": config.architecture(), "optimizer": "adamw"}
  saved = {}
  with ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ck:
    for step, seed in ((1, 11), (2, 12)):
      saved[step] = init_params(CONFIG, jax.random.PRNGKey(seed), std=0.3)
      state = step_lib.init_train_state(saved[step], step_lib.optax.adam(1e-3))  # restored without knowing it
      ck.save(step, state, {"batches": step}, run_config, force=True)
  for step, want in ((None, 2), (1, 1)):
    restored = run_params.restore(str(tmp_path / "run"), step)
    assert restored.step == want and restored.config == config and restored.tokenizer_folder == folder
    jax.tree.map(np.testing.assert_array_equal, restored.params, saved[want])
  records = run(run_dir=str(tmp_path / "run"), prompt=PROMPTS[:2])
  refs = [argmax_loop(saved[2], tok.encode(p), N) for p in PROMPTS[:2]]
  stops = gen.stop_tokens(config, tok)
  assert [{k: r[k] for k in ("completion", "tokens", "finish_reason")} for r in records] == [
      expected(tok, ref, stops) for ref in refs]
  base = run(model=folder, prompt=PROMPTS[:2])
  assert [r["completion"] for r in records] != [r["completion"] for r in base]
  with pytest.raises(ckpt_lib.CheckpointError, match=r"--step 5: not among the checkpoint steps \[1, 2\]"):
    run(run_dir=str(tmp_path / "run"), step=5, prompt=PROMPTS[:1])
  shutil.rmtree(folder + "-moved", ignore_errors=True)
  run_config_gone = dict(run_config, model=folder + "-moved")
  with ckpt_lib.Checkpointer(tmp_path / "run2" / "checkpoints", async_save=False) as ck:
    ck.save(1, step_lib.init_train_state(saved[1], step_lib.optax.sgd(0.1)), {"batches": 1}, run_config_gone,
            force=True)
  with pytest.raises(gen.GenerateError, match=r"the run's model folder .*-moved \(run config field 'model'\) "
                                              r"is not there"):
    run(run_dir=str(tmp_path / "run2"), prompt=PROMPTS[:1])


def test_chat_prompts_get_the_template(model, tok, tmp_path):
  folder, _, _ = model
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  path = tmp_path / "prompts.jsonl"
  path.write_text(json.dumps({"prompt": messages, "chosen": "x", "rejected": "y"}) + "\n\n"
                  + json.dumps({"prompt": "Hi"}) + "\n")
  rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  user_hi = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  items = gen.read_prompts_file(str(path))
  assert items == [(messages, f"{path}:1"), ("Hi", f"{path}:3")]
  ids = [p.ids for p in gen.encode_prompts(items, tok)]
  assert ids == [tok.encode(rendered), tok.encode("Hi")]
  assert tok.encode(rendered)[0] == tok.tokenizer.token_to_id("<|im_start|>")  # specials, not their spelling
  ids = [p.ids for p in gen.encode_prompts(items, tok, chat=True)]  # --chat: a plain prompt as a user turn
  assert ids == [tok.encode(rendered), tok.encode(user_hi)]
  # End to end: the file's chat prompt completes as its rendered text does as a plain prompt.
  records = run(model=folder, prompts=str(path), prompt=(rendered,))
  assert [r["prompt"] for r in records] == [rendered, messages, "Hi"]
  assert records[1]["completion"] == records[0]["completion"]
  assert records[2]["completion"] != records[0]["completion"]


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "ok"', "malformed JSON at column"),
    ('["a"]', "expected a JSON object with a 'prompt' field; got list"),
    ('{"text": "a"}', "missing field 'prompt'"),
    ('{"prompt": 3}', "field 'prompt' must be a string or a list of {role, content} messages, got int"),
    ('{"prompt": [{"role": "robot", "content": "hi"}]}', "field 'prompt[0].role' is 'robot'"),
    ('{"prompt": [{"role": "user"}]}', "field 'prompt[0]' is missing 'content'"),
    ('{"prompt": ""}', "field 'prompt' is empty"),
])
def test_bad_prompts_file_names_file_line_and_field(tmp_path, line, message):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "fine"}\n' + line + "\n")
  with pytest.raises(jsonl.DataError) as e:
    gen.read_prompts_file(str(path))
  assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)


def test_launcher_error_is_one_line_without_traceback(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "fine"}\n{"prompt": [{"role": "user", "content": 1}]}\n')
  r = subprocess.run([sys.executable, "-m", "launch.generate", "--model", "qwen3-tiny", "--prompts", str(path),
                      "--output", str(tmp_path / "out.jsonl")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and r.stdout == "", r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert errors == [f"error: {path}:2: field 'prompt[0].content' must be a string, got int"], r.stderr[-2000:]
  assert not (tmp_path / "out.jsonl").exists()


def test_output_file_is_never_overwritten_without_the_flag(model, tmp_path):
  folder, _, _ = model
  out = tmp_path / "out.jsonl"
  out.write_text("keep me\n")
  with pytest.raises(gen.GenerateError, match=r"--output .*out.jsonl exists; choose a new file or pass --overwrite"):
    run(model=folder, prompt=PROMPTS[:1], output=str(out))
  assert out.read_text() == "keep me\n"
  assert run(model=folder, prompt=PROMPTS[:1], output=str(out), overwrite=True) == []  # written there, not to out
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(lines) == 1 and set(lines[0]) == {"prompt", "completion", "tokens", "finish_reason"}


@pytest.mark.parametrize("kw,message", [
    ({}, "give exactly one of --model"),
    ({"model": "qwen3-tiny", "run_dir": "runs/x"}, "give exactly one of --model"),
    ({"model": "qwen3-tiny", "step": 3}, "--step picks a checkpoint of --run_dir"),
    ({"model": "qwen3-tiny", "prompt": ()}, "no prompts"),
    ({"model": "qwen3-tiny", "temperature": -1.0}, "--temperature: must be >= 0"),
    ({"model": "qwen3-tiny", "top_p": 0.0}, r"--top_p: must be in \(0, 1\]"),
    ({"model": "qwen3-tiny", "max_new_tokens": 0}, "--max_new_tokens: must be >= 1"),
    ({"model": "qwen3-tiny", "prompt": ("",)}, "--prompt #1 is empty"),
    ({"model": "no/such/folder"}, "--model: 'no/such/folder' is neither a local model folder nor a preset"),
    ({"run_dir": "no/such/run"}, "--run_dir no/such/run: no such folder"),
])
def test_bad_settings_name_the_flag(kw, message):
  with pytest.raises(gen.GenerateError, match=message):
    run(**{"prompt": ("x",), **kw})


def test_a_preset_is_the_train_launchers_random_init(tok):
  m = gen.load_model(gen.GenerateConfig(model="qwen3-tiny", seed=3, prompt=("x",)))
  assert m.config == ModelConfig.preset("qwen3-tiny") and m.tokenizer.source == builtin.TOKENIZER
  jax.tree.map(np.testing.assert_array_equal, m.params, init_params(m.config, jax.random.PRNGKey(3)))
  assert gen.stop_tokens(m.config, m.tokenizer) == (2,)  # eos id 2 is the built-in <|im_end|>
