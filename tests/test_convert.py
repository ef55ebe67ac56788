"""launch.convert: the exported dtype (--dtype), and bad model files as one-line launcher errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from dreamjax.model import ConfigError, ModelConfig, hf, init_params
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import step as step_lib
from launch import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Odd sizes (47, 89) so a transposed tensor cannot pass for the right one.
CONFIG = ModelConfig.preset("qwen3_5-tiny").replace(hidden_size=47, intermediate_size=89)
NUMPY = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def bf16_model(folder):
  """Writes a bfloat16 HF folder (as Qwen3 checkpoints ship); returns its params."""
  params = init_params(CONFIG, jax.random.PRNGKey(5), dtype=jnp.bfloat16)
  hf.save_hf(str(folder), params, CONFIG)
  return params


def run_checkpoint(run_dir, params, model):
  """Writes a run's step-3 checkpoint of `params` (float32, as training holds them) trained from `model`."""
  state = step_lib.init_train_state(jax.tree.map(lambda x: x.astype(jnp.float32), params), step_lib.optax.sgd(0.1))
  position = {"epoch": 0, "pref_index": 0, "general_cycle": 0, "general_index": 0, "batches": 3}
  with ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False) as ck:
    ck.save(3, state, position, {"model": model, "model_config": CONFIG.architecture()}, force=True)


def assert_written_as(folder, dtype, params):
  """The folder's tensors and config.json are `dtype`, and load back equal to params cast to it."""
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  assert {str(x.dtype) for x in tensors.values()} == {dtype}
  raw = json.load(open(os.path.join(folder, "config.json")))
  assert raw["dtype"] == raw["torch_dtype"] == dtype
  assert hf.declared_dtype(folder) == dtype
  _, loaded = hf.load(folder, dtype=jnp.dtype(dtype))
  want = jax.tree.map(lambda x: np.asarray(x, np.float32).astype(NUMPY[dtype]), params)
  jax.tree.map(np.testing.assert_array_equal, loaded, want)


@pytest.mark.parametrize("dtype,expected", [("source", "bfloat16"), ("bfloat16", "bfloat16"),
                                            ("float16", "float16"), ("float32", "float32")])
def test_dtype_of_an_export_from_a_bf16_source(tmp_path, dtype, expected):
  """--to orbax keeps float32 params; --to hf writes `dtype`, by default the source's bfloat16 (bit-exact)."""
  params = bf16_model(tmp_path / "src")
  convert.hf_to_orbax(str(tmp_path / "src"), str(tmp_path / "orbax"))
  convert.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "hf"), dtype=dtype)
  assert_written_as(str(tmp_path / "hf"), expected, params)


def test_source_dtype_of_a_run_is_its_model_folders(tmp_path):
  params = bf16_model(tmp_path / "src")
  run_checkpoint(str(tmp_path / "run"), params, str(tmp_path / "src"))
  assert convert.orbax_to_hf(str(tmp_path / "run"), str(tmp_path / "hf")) == 3
  assert_written_as(str(tmp_path / "hf"), "bfloat16", params)
  # A preset (or a model folder no longer there) has no declared dtype: the stored float32.
  run_checkpoint(str(tmp_path / "preset_run"), params, "qwen3_5-tiny")
  convert.orbax_to_hf(str(tmp_path / "preset_run"), str(tmp_path / "hf32"))
  assert_written_as(str(tmp_path / "hf32"), "float32", params)


def test_dtype_errors_write_nothing(tmp_path):
  params = bf16_model(tmp_path / "src")
  run_checkpoint(str(tmp_path / "run"), params, str(tmp_path / "src"))
  raw = json.load(open(tmp_path / "src" / "config.json"))
  with open(tmp_path / "src" / "config.json", "w") as f:
    json.dump(dict(raw, dtype="float8_e4m3fn"), f)
  with pytest.raises(convert.ConvertError, match=r"--dtype source: .*src/config.json declares 'float8_e4m3fn', not "
                                                 r"one of float32, bfloat16, float16; pass --dtype"):
    convert.orbax_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  with open(tmp_path / "src" / "config.json", "w") as f:
    json.dump(dict(raw, dtype=None, torch_dtype=16), f)
  with pytest.raises(ConfigError, match=r"src/config.json: field 'torch_dtype' must be a dtype name"):
    convert.orbax_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  big = dict(params, embed=params["embed"].at[3, 1].set(69632.0))  # past float16's 65504 (exact in bfloat16)
  run_checkpoint(str(tmp_path / "big_run"), big, "qwen3_5-tiny")
  with pytest.raises(hf.ModelFileError, match=r"tensor 'embed_tokens.weight': max \|value\| 6\.963e\+04 overflows "
                                               r"float16 \(largest finite 6\.55e\+04\); export as bfloat16 or float32"):
    convert.orbax_to_hf(str(tmp_path / "big_run"), str(tmp_path / "hf"), dtype="float16")
  assert not (tmp_path / "hf").exists()


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
  ok = launcher("launch.convert", "--to", "orbax", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "ok"))
  assert ok.returncode == 0 and ok.stdout.splitlines() == [f"wrote {tmp_path / 'ok' / convert.PARAMS_DIR} (Orbax) "
                                                           "and config.json"]
  assert ok.stderr.strip() == "", ok.stderr  # no Orbax INFO lines unless --verbosity asks for them
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
