"""The launcher: a run end to end, exact resume after SIGKILL, SIGTERM, and bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dreamjax.data import builtin
from launch import convert
from dreamjax.data import jsonl
from dreamjax.data import tokenize as tok_lib
from dreamjax.model import ConfigError, ModelConfig, hf, init_params
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import loop
from dreamjax.train import options as options_lib
from dreamjax.train import session as session_lib
from dreamjax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max_steps", "7", "--batch_size", "4", "--eval_every", "3", "--eval_examples", "4", "--mesh", "1,1",
        "--max_context_len", "64", "--max_response_len", "48"]


def cli(*args, wait=True, **kw):
  cmd = [sys.executable, "-m", "launch.train", *args]
  env = dict(os.environ, PYTHONPATH=ROOT)
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def final_state(run_dir):
  """Restores the newest checkpoint of a run made with FAST flags."""
  cfg = loop.RunConfig(run_dir=run_dir, batch_size=4)
  model = session_lib.load_model(cfg)
  opt, _ = options_lib.make_optimizer(cfg, options_lib.PRESET_LR, 7)
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(model.params, opt, seed=0))
  with ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False) as ck:
    state, position, _, step = ck.restore(abstract_state=abstract)
  return state, position, step


def test_run_end_to_end(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a relative --run_dir, as in README's command
  run_dir = str(tmp_path / "run")
  summary = loop.run(loop.RunConfig(run_dir="run", max_steps=7, batch_size=4, eval_every=3, eval_examples=4,
                                    mesh="1,1", max_context_len=64, max_response_len=48, save_every=3))
  assert summary["status"] == "finished" and summary["steps"] == 7
  assert summary["tokenization"]["context_truncated"] == 0
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["3", "6", "7"]
  assert os.path.isdir(os.path.join(run_dir, "base_model"))
  lines = [json.loads(x) for x in open(os.path.join(run_dir, "monitor.jsonl"))]
  assert [(x["step"], x["kind"], x["action"]) for x in lines] == [(3, "eval", "continue"), (6, "eval", "continue"),
                                                                  (7, "eval", "continue")]
  assert {"perplexity/ratio", "logps/chosen", "drift/max", "residual_growth/max"} <= set(lines[-1]["figures"])
  tb = os.path.join(run_dir, "tb")
  acc = event_accumulator.EventAccumulator(os.path.join(tb, os.listdir(tb)[0]) if os.path.isfile(
      os.path.join(tb, os.listdir(tb)[0])) else tb)
  acc.Reload()
  tags = set(acc.Tags()["scalars"]) | set(acc.Tags().get("tensors", []))
  for tag in ("train/loss", "train/rewards/accuracies", "train/lr", "train/grad_norm", "train/tokens_per_s",
              "train/step_time_s", "train/grad/layer_0/norm", "eval/perplexity/ratio", "eval/logps/chosen",
              "monitor/drift/max", "monitor/residual_growth/max"):
    assert tag in tags, (tag, sorted(tags)[:40])
  assert {t.split("/")[0] for t in tags} == {"train", "eval", "monitor"}, sorted(tags)
  # The summary's last loss is the one the step reported at step 7, as logged.
  events = acc.Tensors("train/loss") if "train/loss" in acc.Tags().get("tensors", []) else acc.Scalars("train/loss")
  last = events[-1]
  value = float(np.asarray(jax.numpy.asarray(last.tensor_proto.float_val[0] if hasattr(last, "tensor_proto")
                                             else last.value)))
  assert last.step == 7 and value == pytest.approx(summary["last_metrics"]["loss"], rel=1e-6)
  # launch.convert: the run's newest checkpoint -> an HF folder that loads back to the same params.
  state, _, _ = final_state(run_dir)
  assert convert.orbax_to_hf(run_dir, str(tmp_path / "hf")) == 7
  config, params = hf.load(str(tmp_path / "hf"))
  assert config == ModelConfig.preset("qwen3-tiny")
  assert tok_lib.TextTokenizer.from_folder(str(tmp_path / "hf")).vocab_size == config.vocab_size
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_hf_to_orbax_and_back(tmp_path):
  src = os.path.join(ROOT, "tests", "fixtures", "qwen3_5_tiny")
  convert.hf_to_orbax(src, str(tmp_path / "orbax"))
  convert.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "hf"))
  (c1, p1), (c2, p2) = hf.load(src), hf.load(str(tmp_path / "hf"))
  assert c1 == c2
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_the_per_layer_layout_is_refused_by_name_and_converts(tmp_path):
  """A run saved before layers were stacked (params['layers'] a list): resuming it names the layout
  and the way out, and launch.convert restacks it into an HF folder with the same weights."""
  from dreamjax.data.mix import MixerPosition  # pylint: disable=g-import-not-at-top
  from dreamjax.model import layout  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig.preset("qwen3-tiny")
  params = init_params(cfg, jax.random.PRNGKey(4))
  opt = optax.sgd(1e-3)
  legacy = step_lib.init_train_state(dict(params, layers=layout.unstack(params, cfg)), opt)
  run_config = {"model": "qwen3-tiny", "model_config": cfg.architecture()}
  ckpt_dir = str(tmp_path / "old" / "checkpoints")
  position = MixerPosition(epoch=0, pref_index=0, general_cycle=0, general_index=0, batches=1).to_dict()
  with ckpt_lib.Checkpointer(ckpt_dir, async_save=False) as ck:
    ck.save(1, legacy, position, run_config, force=True)
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(params, opt))
  with ckpt_lib.Checkpointer(ckpt_dir, async_save=False) as ck:
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"one entry per layer(.|\n)*launch.convert --to hf"):
      ck.restore(abstract_state=abstract)
  assert convert.orbax_to_hf(str(tmp_path / "old"), str(tmp_path / "hf")) == 1
  _, loaded = hf.load(str(tmp_path / "hf"))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
  ref = loop.RunConfig(run_dir=ref_dir, max_steps=7, batch_size=4, eval_every=3, eval_examples=4, mesh="1,1",
                       max_context_len=64, max_response_len=48, save_every=7)
  assert loop.run(ref)["status"] == "finished"  # in-process: same XLA CPU program as the subprocesses
  proc = cli(*FAST, "--run_dir", run_dir, "--save_every", "1", wait=False)
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= 3 for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert killed_at < 7
  resumed = cli(*FAST, "--run_dir", run_dir, "--save_every", "1")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a, pos_a, step_a = final_state(ref_dir)
  b, pos_b, step_b = final_state(run_dir)
  assert step_a == step_b == 7 and pos_a == pos_b
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  lines = [json.loads(x) for x in open(os.path.join(run_dir, "monitor.jsonl"))]
  assert any(x["kind"] == "resume" for x in lines)


def test_sigterm_saves_and_exits_zero(tmp_path):
  run_dir = str(tmp_path / "run")
  proc = cli(*FAST[:1], "400", *FAST[2:], "--run_dir", run_dir, "--save_every", "1000", wait=False)
  tb = os.path.join(run_dir, "tb")
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.isdir(tb) and os.listdir(tb)):
    time.sleep(0.05)
  time.sleep(1.0)  # a few steps in
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  summary = json.load(open(os.path.join(run_dir, "summary.json")))
  assert summary["status"].startswith("preempted") and 0 < summary["steps"] < 400
  steps = [int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()]
  assert steps == [summary["steps"]]


# ---------------------------------------------------------------------------------------------
# Bad input: each gives a clear error naming what and where, and nothing already written is lost.


def write_lines(path, lines):
  with open(path, "w") as f:
    f.writelines(x + "\n" for x in lines)
  return str(path)


GOOD = json.dumps({"prompt": "Q: hi?\nA:", "chosen": " yes", "rejected": " no"})


@pytest.mark.parametrize("line,expected", [
    ('{"prompt": "a", "chosen": "b"', "2: malformed JSON"),
    (json.dumps({"prompt": "a", "chosen": "b"}), "2: missing field 'rejected'"),
    (json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"}), "2: field 'chosen' must be a string"),
    (json.dumps({"prompt": "a", "chosen": " ", "rejected": "c"}), "2: field 'chosen' is empty"),
])
def test_bad_data_lines_name_file_line_and_field(tmp_path, line, expected):
  path = write_lines(tmp_path / "prefs.jsonl", [GOOD, line, GOOD])
  with pytest.raises(jsonl.DataError, match=f"{path}:{expected}"):
    loop.run(loop.RunConfig(run_dir=str(tmp_path / "run"), data=(path,)))


def test_empty_data_file(tmp_path):
  path = write_lines(tmp_path / "empty.jsonl", [])
  with pytest.raises(jsonl.DataError, match=f"{path}: no valid examples"):
    loop.run(loop.RunConfig(run_dir=str(tmp_path / "run"), data=(path,)))


def test_skip_bad_lines_records_them(tmp_path):
  path = write_lines(tmp_path / "prefs.jsonl", [GOOD] * 30 + ["{oops"])
  cfg = loop.RunConfig(run_dir=str(tmp_path), data=(path,), skip_bad_lines=True, eval_examples=2)
  tok = tok_lib.TextTokenizer.from_folder(builtin.TOKENIZER)
  prefs, general, eval_pref, _, _, bad = loop.load_data(cfg, tok, str(tmp_path))
  assert bad.count == 1 and len(prefs) + len(eval_pref) == 30 and not general
  assert f"{path}:31: malformed JSON" in open(tmp_path / "bad_lines.txt").read()


def test_unknown_flag_value_is_rejected_by_the_cli():
  r = cli("--optimizer", "sgd", "--run_dir", "/nonexistent/never_created")
  assert r.returncode != 0
  assert "--optimizer" in r.stderr and "apollo" in r.stderr
  assert not os.path.exists("/nonexistent/never_created")


def test_model_folder_without_config_or_weights(tmp_path):
  empty = tmp_path / "empty_model"
  empty.mkdir()
  with pytest.raises(ConfigError, match="config.json"):
    loop.run(loop.RunConfig(run_dir=str(tmp_path / "run"), model=str(empty)))
  cfg = ModelConfig.preset("qwen3-tiny")
  folder = tmp_path / "no_weights"
  hf.save_hf(str(folder), init_params(cfg, jax.random.PRNGKey(0)), cfg)
  for f in os.listdir(folder):
    if f.endswith(".safetensors") or f.endswith(".json") and "index" in f:
      os.remove(folder / f)
  for f in os.listdir(builtin.TOKENIZER):  # the tokenizer is read before the weights
    shutil.copy(os.path.join(builtin.TOKENIZER, f), folder)
  with pytest.raises(hf.CheckpointError, match=str(folder)):
    loop.run(loop.RunConfig(run_dir=str(tmp_path / "run"), model=str(folder)))
  missing = loop.RunConfig(run_dir=str(tmp_path / "run"), model=str(tmp_path / "nowhere"))
  with pytest.raises(loop.RunError, match="--model: .*nowhere.* local model folder"):
    loop.run(missing)


def test_tokenizer_model_vocab_mismatch(tmp_path):
  cfg = ModelConfig.preset("qwen3-tiny").replace(vocab_size=101)
  folder = tmp_path / "small_vocab"
  hf.save_hf(str(folder), init_params(cfg, jax.random.PRNGKey(0)), cfg)
  for name in os.listdir(builtin.TOKENIZER):
    with open(os.path.join(builtin.TOKENIZER, name)) as src, open(folder / name, "w") as dst:
      dst.write(src.read())
  with pytest.raises(loop.RunError, match="vocab mismatch: .*263 ids but the model's vocab_size is 101"):
    loop.run(loop.RunConfig(run_dir=str(tmp_path / "run"), model=str(folder)))


def test_run_dir_not_writable(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(loop.RunError, match="--run_dir: .*a_file/run.* is not writable"):
    loop.run(loop.RunConfig(run_dir=str(blocker / "run")))
  assert blocker.read_text() == "x"


def test_resume_with_changed_model_is_refused_and_keeps_the_run(tmp_path):
  run_dir = str(tmp_path / "run")
  common = dict(run_dir=run_dir, max_steps=1, batch_size=4, eval_every=1, eval_examples=4, mesh="1,1",
                max_context_len=64, max_response_len=48, save_every=1)
  loop.run(loop.RunConfig(**common))
  before = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
  with pytest.raises(loop.RunError, match="changed model_config"):
    loop.run(loop.RunConfig(**dict(common, model="qwen3_5-tiny")))
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == before


def test_chat_format_tokenisation(tmp_path):
  tok = tok_lib.TextTokenizer.from_folder(builtin.TOKENIZER)
  ex = jsonl.parse_preference({"prompt": [{"role": "user", "content": "hi"}],
                               "chosen": [{"role": "assistant", "content": "yes"}],
                               "rejected": [{"role": "assistant", "content": "no"}]}, "f:1")
  t = tok_lib.encode_preference(ex, tok, 100, 100)
  assert tok.tokenizer.decode(t.context, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert tok.tokenizer.decode(t.chosen, skip_special_tokens=False) == "yes<|im_end|>\n"
  plain = jsonl.parse_preference({"prompt": "Q", "chosen": " a", "rejected": " b"}, "f:2")
  t = tok_lib.encode_preference(plain, tok, 100, 100)
  assert t.chosen[-1] == tok.eos_id and tok.decode(t.chosen) == " a"
  # Over-long: the context keeps its end; or the example is dropped and counted.
  long = jsonl.parse_preference({"prompt": "x" * 50 + "END", "chosen": " a", "rejected": " b"}, "f:3")
  stats = tok_lib.TokenStats()
  t = tok_lib.encode_preference(long, tok, 5, 100, stats=stats)
  assert len(t.context) == 5 and tok.decode(t.context).endswith("END") and stats.context_truncated == 1
  assert tok_lib.encode_preference(long, tok, 5, 100, overlong="drop", stats=stats) is None
  assert stats.dropped_overlong == 1


def test_bad_dropout_is_named_and_nothing_is_written(tmp_path):
  run_dir = tmp_path / "run"
  with pytest.raises(loop.RunError, match=r"--dropout: must be in \[0, 1\), got 1.5"):
    loop.run(loop.RunConfig(run_dir=str(run_dir), dropout=1.5))
  assert not run_dir.exists()
