"""The launcher: a run end to end, exact resume after SIGKILL, SIGTERM and Ctrl-C, resume from the
run folder's recorded flags, TRL flag names, and bad input."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from absl import flags
from tensorboard.backend.event_processing import event_accumulator

from dreamjax.data import builtin
from dreamjax.dream import cycle
from launch import convert
from launch import flags as launch_flags
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


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """Returns the folder of an uninterrupted FAST run (in-process: the same XLA CPU program as the
  subprocesses)."""
  ref_dir = str(tmp_path_factory.mktemp("reference") / "ref")
  ref = loop.RunConfig(run_dir=ref_dir, max_steps=7, batch_size=4, eval_every=3, eval_examples=4, mesh="1,1",
                       max_context_len=64, max_response_len=48, save_every=7)
  assert loop.run(ref)["status"] == "finished"
  return ref_dir


def assert_same_final_state(ref_dir, run_dir):
  a, pos_a, step_a = final_state(ref_dir)
  b, pos_b, step_b = final_state(run_dir)
  assert step_a == step_b == 7 and pos_a == pos_b
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def wait_for_checkpoint(proc, ckpt_dir, at_least):
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= at_least for d in os.listdir(ckpt_dir)):
      return
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be interrupted"


def test_sigkill_then_resume_is_bitwise_equal(tmp_path, reference_run):
  run_dir = str(tmp_path / "killed")
  proc = cli(*FAST, "--run_dir", run_dir, "--save_every", "1", wait=False)
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  wait_for_checkpoint(proc, ckpt_dir, 3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert killed_at < 7
  resumed = cli(*FAST, "--run_dir", run_dir, "--save_every", "1")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert_same_final_state(reference_run, run_dir)
  lines = [json.loads(x) for x in open(os.path.join(run_dir, "monitor.jsonl"))]
  assert any(x["kind"] == "resume" for x in lines)


def test_ctrl_c_saves_prints_the_resume_command_which_resumes_bitwise(tmp_path, reference_run):
  run_dir = str(tmp_path / "interrupted")
  proc = cli(*FAST, "--run_dir", run_dir, "--save_every", "1", wait=False)
  wait_for_checkpoint(proc, os.path.join(run_dir, "checkpoints"), 2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  # Progress from the first second: what is loaded and compiled, before the bar.
  assert err.index("loading qwen3-tiny") < err.index("compiling the train step") < err.index("received SIGINT")
  summary = json.load(open(os.path.join(run_dir, "summary.json")))
  assert summary["status"] == f"preempted at step {summary['steps']}; saved" and summary["steps"] < 7
  assert json.loads(out)["status"] == summary["status"]
  (line,) = [x for x in err.splitlines() if "to resume: " in x]
  command = shlex.split(line.split("to resume: ", 1)[1])
  assert command == ["python", "-m", "launch.train", "--run_dir", run_dir]  # the folder records every other flag
  resumed = cli(*command[3:])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed {run_dir} at step {summary['steps']} of 7" in resumed.stderr
  assert_same_final_state(reference_run, run_dir)


def test_a_second_ctrl_c_ends_at_once_and_the_rerun_resumes_from_the_last_committed_step(tmp_path):
  run_dir = str(tmp_path / "run")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  err_path = tmp_path / "stderr.txt"
  with open(err_path, "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", *FAST[:1], "400", *FAST[2:], "--run_dir", run_dir,
                             "--save_every", "1"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.DEVNULL, stderr=err)
  wait_for_checkpoint(proc, ckpt_dir, 2)
  proc.send_signal(signal.SIGINT)
  deadline = time.time() + 60
  while "received SIGINT" not in err_path.read_text() and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)  # while it finishes its step and saves (seconds, measured)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGINT, err_path.read_text()[-2000:]
  newest = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  # A save cut short leaves Orbax's tmp folder (the kill may have left a real one too).
  os.makedirs(os.path.join(ckpt_dir, f"{newest + 50}.orbax-checkpoint-tmp-1733600000", "state"))
  resumed = cli("--run_dir", run_dir, "--max_steps", str(newest + 1))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed {run_dir} at step {newest} of {newest + 1}" in resumed.stderr
  assert json.loads(resumed.stdout)["steps"] == newest + 1
  assert not [d for d in os.listdir(ckpt_dir) if "tmp" in d]


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


def test_a_signal_during_the_finish_lets_it_complete_and_a_rerun_does_nothing(tmp_path, monkeypatch):
  run_dir = str(tmp_path / "run")
  cfg = loop.RunConfig(run_dir=run_dir, max_steps=2, batch_size=4, eval_every=2, eval_examples=4, mesh="1,1",
                       max_context_len=64, max_response_len=48, save_every=1)
  close = session_lib.Session.close

  def close_after_ctrl_c(self):
    os.kill(os.getpid(), signal.SIGINT)  # after the last step: during the final save
    close(self)

  monkeypatch.setattr(session_lib.Session, "close", close_after_ctrl_c)
  said = []
  summary = loop.run(cfg, progress=said.append)
  monkeypatch.undo()
  assert summary["status"] == "finished" and summary["steps"] == 2 and summary["last_metrics"]
  assert said[0] == "loading qwen3-tiny…" and "compiling the train step (first step)…" in said
  path = os.path.join(run_dir, "summary.json")
  before = open(path).read()
  assert json.loads(before)["last_metrics"] == summary["last_metrics"]
  said = []
  again = loop.run(cfg, progress=said.append)
  assert again["nothing_to_do"] and again["steps"] == 2 and again["last_metrics"] == summary["last_metrics"]
  assert open(path).read() == before and not any("compiling" in x for x in said)


# ---------------------------------------------------------------------------------------------
# Flags: the run folder's recorded ones, TRL's names.


def parse(config_cls, *argv):
  """Returns fresh FlagValues holding config_cls's flags, parsed from argv (as a launcher's)."""
  fv = flags.FlagValues()
  launch_flags.define(config_cls, fv)
  fv(["prog", *argv])
  return fv


def test_run_dir_alone_continues_with_the_recorded_flags(tmp_path):
  run_dir = str(tmp_path / "run")
  first = parse(loop.RunConfig, "--run_dir", run_dir, "--batch_size", "4", "--max_steps", "3", "--eval_examples", "4",
                "--mesh", "1,1", "--max_context_len", "64", "--max_response_len", "48", "--eval_every", "3")
  cfg, taken = launch_flags.resolve(loop.RunConfig, first)
  assert taken == {} and loop.run(cfg)["steps"] == 3
  fv = parse(loop.RunConfig, "--run_dir", run_dir, "--max_steps", "5")
  cfg2, taken = launch_flags.resolve(loop.RunConfig, fv)
  assert cfg2 == cfg.replace(max_steps=5, lr=options_lib.PRESET_LR)  # the record holds the lr it resolved
  assert taken == {"batch_size": 4, "eval_examples": 4, "mesh": "1,1", "max_context_len": 64,
                   "max_response_len": 48, "eval_every": 3, "lr": options_lib.PRESET_LR}
  said = []
  summary = loop.run(cfg2, progress=said.append)
  assert f"resumed {run_dir} at step 3 of 5" in said and summary["steps"] == 5
  assert launch_flags.resume_command("launch.train", cfg2, loop.RunConfig, fv) == (
      f"python -m launch.train --run_dir {run_dir} --max_steps=5")
  # A given flag wins, and one that changes a setting a resume must keep stays a clear error.
  cfg3, _ = launch_flags.resolve(loop.RunConfig, parse(loop.RunConfig, "--run_dir", run_dir, "--batch_size", "8"))
  with pytest.raises(loop.RunError, match=r"config.json: resume with a changed batch_size(.|\n)*saved 4, now 8"):
    loop.run(cfg3)
  # --noresume reads no record.
  assert launch_flags.resolve(loop.RunConfig, parse(loop.RunConfig, "--run_dir", run_dir, "--noresume"))[1] == {}


def test_a_bad_recorded_value_names_the_file_and_the_field(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"batch_size": "four", "model_config": {"anything": 1}}, f)
  with pytest.raises(options_lib.RunError, match=r"config.json: field 'batch_size' records 'four'.*--batch_size"):
    launch_flags.resolve(loop.RunConfig, parse(loop.RunConfig, "--run_dir", str(tmp_path)))


TRL = {"learning_rate": ("2e-05", "lr", 2e-5), "per_device_train_batch_size": ("16", "batch_size", 16),
       "gradient_accumulation_steps": ("2", "grad_accum", 2), "lr_scheduler_type": ("cosine", "schedule", "cosine"),
       "adam_beta1": ("0.8", "b1", 0.8), "adam_beta2": ("0.95", "b2", 0.95),
       "save_total_limit": ("2", "keep", 2), "max_prompt_length": ("100", "max_context_len", 100),
       "max_completion_length": ("50", "max_response_len", 50), "model_name_or_path": ("qwen3_5-tiny", "model",
                                                                                       "qwen3_5-tiny")}
TRL_TRAIN_ONLY = {"num_train_epochs": ("2", "epochs", 2), "save_steps": ("7", "save_every", 7),
                  "eval_steps": ("5", "eval_every", 5)}


@pytest.mark.parametrize("config_cls", [loop.RunConfig, cycle.CycleConfig])
def test_trl_flag_names_are_aliases_listed_in_helpfull(config_cls, tmp_path):
  table = dict(TRL, **(TRL_TRAIN_ONLY if config_cls is loop.RunConfig else {}))
  out_dir = str(tmp_path / "out")
  fv = parse(config_cls, *[f"--{k}={v}" for k, (v, _, _) in table.items()], f"--output_dir={out_dir}",
             "--gradient_checkpointing")
  cfg, _ = launch_flags.resolve(config_cls, fv)
  assert {name: getattr(cfg, name) for _, name, _ in table.values()} == {name: v for _, name, v in table.values()}
  assert cfg.run_dir == out_dir and cfg.remat
  assert launch_flags.given(config_cls, fv) == {name for _, name, _ in table.values()} | {"run_dir", "remat"}
  assert not parse(config_cls, "--nogradient_checkpointing").remat
  helpfull = fv.get_help()
  for alias in list(table) + ["output_dir", "gradient_checkpointing"]:
    assert re.search(rf"--(\[no\])?{alias}: Alias for --", helpfull), alias
  assert "GLOBAL batch" in helpfull  # per_device_train_batch_size: what it means here
  if config_cls is cycle.CycleConfig:  # no such fields in the dream: no alias
    assert not any(a in fv for a in TRL_TRAIN_ONLY)


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
  with pytest.raises(hf.ModelFileError, match=str(folder)):
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


def test_eval_data_is_held_out_and_scored_with_the_training_metrics(tmp_path):
  """--eval_data: a separate held-out file (nothing carved out of --data), evaluated with the
  objective's metrics; an example-mean metric equals one recomputation on all held-out examples."""
  lines = open(builtin.PREFERENCES, encoding="utf-8").read().splitlines()
  data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
  data.write_text("\n".join(lines[:40]) + "\n")
  held.write_text("\n".join(lines[40:47]) + "\n")  # 7 examples: batches of 4 and 3
  cfg = loop.RunConfig(run_dir=str(tmp_path / "run"), data=(str(data),), eval_data=(str(held),), max_steps=4,
                       batch_size=4, eval_every=4, save_every=4, mesh="1,1", max_context_len=64,
                       max_response_len=48, general_ratio=0.25)
  summary = loop.run(cfg)
  assert summary["held_out"]["preference"] == 7 and summary["train_examples"]["preference"] == 40
  figures = [json.loads(x) for x in open(tmp_path / "run" / "monitor.jsonl")][-1]["figures"]
  assert {"eval_data/loss", "eval_data/rewards/accuracies", "eval_data/log_odds_ratio"} <= set(figures)
  # Recompute on one batch of all 7 with the checkpoint's params (a mean over examples).
  model = session_lib.load_model(cfg)
  tok = model.tokenizer
  exs = [tok_lib.encode_preference(e, tok, 64, 48, "truncate") for e in jsonl.read_preferences(str(held))]
  c_len, r_len = summary["context_len"], summary["response_len"]
  from dreamjax.train import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from dreamjax.train import run_params  # pylint: disable=g-import-not-at-top

  params = run_params.restore(str(tmp_path / "run")).params
  _, metrics = step_lib.batch_loss(params, batch_lib.collate(exs, c_len, r_len, pad_id=tok.pad_id or 0),
                                   config=model.config, objective="orpo", gradient_mode="frozen",
                                   objective_kwargs={"beta": 0.1})
  for k in ("log_odds_ratio", "rewards/margins", "logps/chosen"):
    np.testing.assert_allclose(figures[f"eval_data/{k}"], float(metrics[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  with pytest.raises(jsonl.DataError, match="nope.jsonl: no such file"):
    loop.run(cfg.replace(run_dir=str(tmp_path / "run2"), eval_data=(str(tmp_path / "nope.jsonl"),)))
