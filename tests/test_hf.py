"""HF folders: config.json parsing and errors, safetensors load/export, placement, tokenizer."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dreamjax import model as M
from dreamjax.model import hf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(name):
  folder = os.path.join(FIXTURES, name)
  if not os.path.isfile(os.path.join(folder, "model.safetensors")):
    pytest.skip(f"fixture {folder} not generated yet (run tests/make_fixtures.py with transformers)")
  return folder


@functools.lru_cache(maxsize=None)
def fwd(config):
  return jax.jit(functools.partial(M.forward, config=config))


def logits_of(cfg, params):
  toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 13)), jnp.int32)
  mask = jnp.ones_like(toks)
  return fwd(cfg)(params, toks, M.positions_from_mask(mask), mask)[0]


# --------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_tied", "qwen3_5_tiny"])
def test_export_reproduces_the_transformers_folder(tmp_path, name):
  """Export of a loaded transformers checkpoint gives back its tensors (names, shapes, values) and
  its model-defining config fields, so transformers loads our exports as it loads its own."""
  src = fixture(name)
  cfg, params = hf.load(src)
  hf.save_hf(str(tmp_path), params, cfg)
  want, got = load_file(os.path.join(src, "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  want_cfg, got_cfg = json.load(open(os.path.join(src, "config.json"))), json.load(open(tmp_path / "config.json"))
  ignore = {"transformers_version", "use_cache", "initializer_range", "attention_dropout", "max_window_layers",
            "sliding_window", "use_sliding_window", "dtype", "torch_dtype", "bos_token_id"}
  for k in set(want_cfg) - ignore:
    if k == "layer_types" and want_cfg["model_type"] == "qwen3":
      continue  # implied (all full attention)
    assert got_cfg.get(k) == want_cfg[k], k


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3_5-tiny"])
def test_export_load_round_trip_single_and_sharded(tmp_path, name):
  cfg = M.ModelConfig.preset(name)
  params = M.init_params(cfg, jax.random.PRNGKey(1))
  hf.save_hf(str(tmp_path / "one"), params, cfg)
  hf.save_hf(str(tmp_path / "sharded"), params, cfg, max_shard_bytes=20_000)
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
  want = logits_of(cfg, params)
  for sub in ("one", "sharded"):
    cfg2, params2 = hf.load(str(tmp_path / sub))
    # chunk_size is not an HF field (a numerics knob only): everything else round-trips.
    assert cfg2.replace(chunk_size=cfg.chunk_size) == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    np.testing.assert_array_equal(logits_of(cfg, params2), want)


def test_bfloat16_round_trip_and_dtype_conversion(tmp_path):
  cfg = M.ModelConfig.preset("qwen3_5-tiny")
  params = M.init_params(cfg, jax.random.PRNGKey(2), dtype=jnp.bfloat16)
  hf.save_hf(str(tmp_path), params, cfg)
  assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
  assert load_file(str(tmp_path / "model.safetensors"))["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  _, same = hf.load(str(tmp_path), dtype=jnp.bfloat16)
  jax.tree.map(np.testing.assert_array_equal, same, params)
  _, f32 = hf.load(str(tmp_path), dtype=jnp.float32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(f32))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float32)), f32, params)


def test_place_callback_sees_every_tensor_once_in_our_layout():
  folder = fixture("qwen3_5_tiny")
  cfg = M.ModelConfig.from_hf(folder)
  seen = []
  dev = jax.devices()[-1]

  def place(path, x):
    seen.append((path, x.shape))
    return jax.device_put(x, dev)

  params = hf.load_params(folder, cfg, place=place)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert len(seen) == len(leaves) == len({p for p, _ in seen})
  shapes = dict(seen)
  assert shapes[("embed",)] == (cfg.vocab_size, cfg.hidden_size)
  assert shapes[("lm_head",)] == (cfg.hidden_size, cfg.vocab_size)  # (in, out)
  # Layer leaves come whole, stacked over the layers of their kind (4 DeltaNet, 1 attention).
  n_lin, n_full = cfg.layer_types.count(M.LINEAR), cfg.layer_types.count(M.FULL)
  assert shapes[("layers", M.LINEAR, "linear_attn", "conv_weight")] == (n_lin, cfg.linear_conv_kernel,
                                                                        cfg.linear_conv_dim)
  assert shapes[("layers", M.FULL, "attn", "q_proj")] == (n_full, cfg.hidden_size, 2 * cfg.num_heads * cfg.head_dim)
  assert all(x.devices() == {dev} for _, x in leaves)


# --------------------------------------------------------------------------------------------
# Errors name the file and the field / tensor.


def write_config(folder, raw):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(raw, f)
  return str(folder)


def test_config_errors_name_the_file_and_field(tmp_path):
  base = json.load(open(os.path.join(fixture("qwen3_5_tiny"), "config.json")))
  with pytest.raises(M.ConfigError, match=r"config.json: field 'model_type' is 'llama'"):
    M.ModelConfig.from_hf(write_config(tmp_path, dict(base, model_type="llama")))
  for field in ("linear_key_head_dim", "vocab_size", "num_hidden_layers"):
    missing = {k: v for k, v in base.items() if k != field}
    with pytest.raises(M.ConfigError, match=rf"{tmp_path}/config.json: missing field '{field}'"):
      M.ModelConfig.from_hf(write_config(tmp_path, missing))
  qwen3 = json.load(open(os.path.join(fixture("qwen3_tiny"), "config.json")))
  with pytest.raises(M.ConfigError, match=r"missing field 'hidden_size'"):
    M.ModelConfig.from_hf(write_config(tmp_path, {k: v for k, v in qwen3.items() if k != "hidden_size"}))
  with pytest.raises(M.ConfigError, match="no config.json"):
    M.ModelConfig.from_hf(str(tmp_path / "nowhere"))
  (tmp_path / "config.json").write_text("{bad json")
  with pytest.raises(M.ConfigError, match=r"malformed JSON at line 1"):
    M.ModelConfig.from_hf(str(tmp_path))
  with pytest.raises(M.ConfigError, match=r"'qwen3_5' without field 'text_config'"):
    M.ModelConfig.from_hf(write_config(tmp_path, {"model_type": "qwen3_5"}))
  with pytest.raises(M.ConfigError, match=r"unknown preset 'gpt2'"):
    M.ModelConfig.preset("gpt2")


def test_multimodal_wrapper_reads_text_config(tmp_path):
  base = json.load(open(os.path.join(fixture("qwen3_5_tiny"), "config.json")))
  text = {k: v for k, v in base.items() if k != "model_type"}  # text_config may omit it
  wrapped = {"model_type": "qwen3_5", "text_config": text}
  assert M.ModelConfig.from_hf(write_config(tmp_path, wrapped)) == M.ModelConfig.from_hf(fixture("qwen3_5_tiny"))


def test_config_is_hashable_static_arg():
  cfg = M.ModelConfig.preset("qwen3_5-tiny")
  assert hash(cfg) == hash(M.ModelConfig.preset("qwen3_5-tiny").replace())
  with pytest.raises(Exception):
    cfg.hidden_size = 3  # frozen


def test_weight_errors_name_the_tensor_and_file(tmp_path):
  src = fixture("qwen3_tiny")
  folder = tmp_path / "w"
  write_config(folder, json.load(open(os.path.join(src, "config.json"))))
  with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
    hf.load(str(folder))
  tensors = load_file(os.path.join(src, "model.safetensors"))
  # Missing tensor.
  save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
            str(folder / "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match=r"'layers.1.mlp.up_proj.weight' is missing"):
    hf.load(str(folder))
  # Unexpected tensor.
  save_file(dict(tensors, **{"model.layers.9.mlp.up_proj.weight": tensors["model.norm.weight"]}),
            str(folder / "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match=r"model.safetensors: unexpected tensors .*layers.9.mlp.up_proj"):
    hf.load(str(folder))
  # Shape mismatch (the config says a wider MLP than the weights have).
  save_file(tensors, str(folder / "model.safetensors"))
  write_config(folder, dict(json.load(open(os.path.join(src, "config.json"))), intermediate_size=89))
  with pytest.raises(hf.CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                               r"shape \(88, 48\); the config expects \(89, 48\)"):
    hf.load(str(folder))
  # Sharded index pointing at a missing shard.
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
  with pytest.raises(hf.CheckpointError, match=r"shard 'gone.safetensors' is listed but missing"):
    hf.load(str(folder))


def test_tokenizer_errors(tmp_path):
  with pytest.raises(M.ConfigError, match="no tokenizer.json"):
    hf.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(M.ConfigError, match="cannot be read as a tokenizer"):
    hf.load_tokenizer(str(tmp_path))
