"""Bad model files through the launchers: one-line errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from dreamjax.model import ModelConfig, hf, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Odd sizes (47, 89) so a transposed tensor cannot pass for the right one.
CONFIG = ModelConfig.preset("qwen3_5-tiny").replace(hidden_size=47, intermediate_size=89)


def bf16_model(folder):
  """Writes a bfloat16 HF folder (as Qwen3 checkpoints ship); returns its params."""
  params = init_params(CONFIG, jax.random.PRNGKey(5), dtype=jnp.bfloat16)
  hf.save_hf(str(folder), params, CONFIG)
  return params


# ---------------------------------------------------------------------------------------------
# Bad model files through the launchers: exit status 2, one line naming the file, no traceback.


def launcher(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def assert_one_line_error(r, *fragments):
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])


def test_convert_cli_refuses_a_corrupt_safetensors_file(tmp_path):
  bf16_model(tmp_path / "src")
  path = tmp_path / "src" / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 7])  # an interrupted download
  r = launcher("launch.convert", "--to", "orbax", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out"))
  assert_one_line_error(r, f"{path}: not a readable safetensors file", "truncated or corrupt")
  assert not (tmp_path / "out").exists() and path.read_bytes() == data[: len(data) - 7]


def test_train_cli_refuses_a_config_field_of_the_wrong_type(tmp_path):
  folder = tmp_path / "model"
  bf16_model(folder)
  raw = json.load(open(folder / "config.json"))
  with open(folder / "config.json", "w") as f:
    json.dump(dict(raw, num_hidden_layers=3.5), f)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "notes.txt").write_text("kept")
  r = launcher("launch.train", "--model", str(folder), "--run_dir", str(run_dir), "--max_steps", "1")
  assert_one_line_error(r, f"{folder}/config.json: field 'num_hidden_layers' must be a positive integer, got 3.5")
  assert os.listdir(run_dir) == ["notes.txt"] and (run_dir / "notes.txt").read_text() == "kept"
