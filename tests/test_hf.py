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
  with pytest.raises(hf.ModelFileError, match="no model.safetensors"):
    hf.load(str(folder))
  tensors = load_file(os.path.join(src, "model.safetensors"))
  # Missing tensor.
  save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
            str(folder / "model.safetensors"))
  with pytest.raises(hf.ModelFileError, match=r"'layers.1.mlp.up_proj.weight' is missing"):
    hf.load(str(folder))
  # Unexpected tensor.
  save_file(dict(tensors, **{"model.layers.9.mlp.up_proj.weight": tensors["model.norm.weight"]}),
            str(folder / "model.safetensors"))
  with pytest.raises(hf.ModelFileError, match=r"model.safetensors: unexpected tensors .*layers.9.mlp.up_proj"):
    hf.load(str(folder))
  # Shape mismatch (the config says a wider MLP than the weights have).
  save_file(tensors, str(folder / "model.safetensors"))
  write_config(folder, dict(json.load(open(os.path.join(src, "config.json"))), intermediate_size=89))
  with pytest.raises(hf.ModelFileError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                               r"shape \(88, 48\); the config expects \(89, 48\)"):
    hf.load(str(folder))
  # Sharded index pointing at a missing shard.
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
  with pytest.raises(hf.ModelFileError, match=r"shard 'gone.safetensors' is listed but missing"):
    hf.load(str(folder))


def test_tokenizer_errors(tmp_path):
  with pytest.raises(M.ConfigError, match="no tokenizer.json"):
    hf.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(M.ConfigError, match="cannot be read as a tokenizer"):
    hf.load_tokenizer(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Unreadable files: a clear error naming the file and the field, never a traceback; the file is
# left as it was.


def unchanged_after(path, err, match, fn):
  """Asserts fn() raises err matching `match` (the file's path included) and leaves the file's bytes as they were."""
  before = open(path, "rb").read()
  with pytest.raises(err, match=match) as e:
    fn()
  assert str(path) in str(e.value), e.value
  assert open(path, "rb").read() == before
  return e.value


QWEN3 = {"model_type": "qwen3", "vocab_size": 263, "hidden_size": 47, "intermediate_size": 89,
         "num_hidden_layers": 3, "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 14,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "eos_token_id": 2}


@pytest.mark.parametrize("data,match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"not UTF-8 text \(byte 0x89 at offset 0\); expected a JSON object"),
    (json.dumps(QWEN3).encode("utf-16"), r"not UTF-8 text \(byte 0xff at offset 0\)"),
    (json.dumps(QWEN3)[:-9].encode(), r"malformed JSON at line 1 column"),
    (b"[1, 2, 3]", r"expected a JSON object \{\.\.\.\} at the top level, got a list"),
    (b'"qwen3"', r"expected a JSON object .* got a string"),
    (b"", r"malformed JSON at line 1 column 1"),
])
def test_config_json_that_is_not_a_json_object(tmp_path, data, match):
  (tmp_path / "config.json").write_bytes(data)
  unchanged_after(tmp_path / "config.json", M.ConfigError, rf"{tmp_path}/config.json: {match}",
                  lambda: M.ModelConfig.from_hf(str(tmp_path)))


@pytest.mark.parametrize("field,value,expected", [
    ("hidden_size", "big", r"a positive integer, got 'big' \(a string\)"),
    ("hidden_size", 47.0, r"a positive integer, got 47.0 \(a float\)"),
    ("num_attention_heads", 0, r"a positive integer, got 0 \(an integer\)"),
    ("vocab_size", True, r"a positive integer, got true \(a boolean\)"),
    ("intermediate_size", None, r"is null; expected a value"),
    ("num_key_value_heads", [1], r"a positive integer, got \[1\] \(a list\)"),
    ("rms_norm_eps", "1e-6", r"a positive number, got '1e-6'"),
    ("tie_word_embeddings", "false", r"true or false, got 'false'"),
    ("eos_token_id", [2, "</s>"], r"a token id \(an integer >= 0\), a list of them, or null"),
    ("pad_token_id", -1, r"a token id \(an integer >= 0\) or null, got -1"),
    ("rope_parameters", "default", r"an object \{\.\.\.\} or null, got 'default'"),
])
def test_config_field_of_the_wrong_type_is_named(tmp_path, field, value, expected):
  write_config(tmp_path, dict(QWEN3, **{field: value}))
  unchanged_after(tmp_path / "config.json", M.ConfigError, rf"config.json: field '{field}' (must be )?{expected}",
                  lambda: M.ModelConfig.from_hf(str(tmp_path)))


def test_nested_and_consistency_errors_name_the_file(tmp_path):
  rope = {"rope_type": "default", "rope_theta": "big"}
  with pytest.raises(M.ConfigError, match=r"config.json: field 'rope_parameters.rope_theta' must be a positive"):
    M.ModelConfig.from_hf(write_config(tmp_path, dict(QWEN3, rope_parameters=rope)))
  with pytest.raises(M.ConfigError, match=rf"{tmp_path}/config.json: num_heads 5 \(HF 'num_attention_heads'\) is "
                                          r"not a multiple of num_kv_heads 2"):
    M.ModelConfig.from_hf(write_config(tmp_path, dict(QWEN3, num_key_value_heads=2)))
  wrapped = {"model_type": "qwen3_5", "text_config": [QWEN3]}
  with pytest.raises(M.ConfigError, match=r"config.json: field 'text_config' must be an object"):
    M.ModelConfig.from_hf(write_config(tmp_path, wrapped))
  base = json.load(open(os.path.join(fixture("qwen3_5_tiny"), "config.json")))
  with pytest.raises(M.ConfigError, match=r"config.json \(text_config\): field 'linear_key_head_dim' must be a "
                                          r"positive integer, got 12.5"):
    M.ModelConfig.from_hf(write_config(tmp_path, {"model_type": "qwen3_5",
                                                  "text_config": dict(base, linear_key_head_dim=12.5)}))


def test_config_json_with_a_utf8_bom_reads_as_without(tmp_path):
  plain = M.ModelConfig.from_hf(write_config(tmp_path / "plain", QWEN3))
  (tmp_path / "bom").mkdir()
  (tmp_path / "bom" / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(QWEN3, indent=1).encode())
  assert M.ModelConfig.from_hf(str(tmp_path / "bom")) == plain
  assert (plain.hidden_size, plain.num_heads, plain.head_dim, plain.eos_token_ids) == (47, 5, 14, (2,))


def corrupt_truncated(data):
  return data[: len(data) // 2]


def corrupt_header_length(data):  # the first 8 bytes are the little-endian header length
  return b"\xff" * 8 + data[8:]


def corrupt_header_json(data):
  return data[:8] + b"#garbage" * 4 + data[40:]


def corrupt_tiny(data):
  return data[:5]


@pytest.mark.parametrize("corrupt,reason", [
    (corrupt_truncated, "incomplete metadata"), (corrupt_header_length, "header too large"),
    (corrupt_header_json, "invalid JSON in header"), (corrupt_tiny, "header too small"),
])
@pytest.mark.parametrize("sharded", [False, True])
def test_corrupt_safetensors_names_the_file(tmp_path, corrupt, reason, sharded):
  cfg = M.ModelConfig.preset("qwen3-tiny")
  hf.save_hf(str(tmp_path), M.init_params(cfg, jax.random.PRNGKey(3)), cfg,
             max_shard_bytes=30_000 if sharded else 4 << 30)
  shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(shards) > 2 if sharded else shards == ["model.safetensors"]
  path = tmp_path / shards[-1]  # the last shard: the error comes mid-load, after other tensors were read
  path.write_bytes(corrupt(path.read_bytes()))
  err = unchanged_after(path, hf.ModelFileError, rf"{path}: not a readable safetensors file \(.*{reason}.*\); it may "
                        "be truncated or corrupt", lambda: hf.load(str(tmp_path)))
  assert "\n" not in str(err)


@pytest.mark.parametrize("index,match", [
    (b"\xff\xfe\x00binary", r"not UTF-8 text \(byte 0xff at offset 0\)"),
    (b"[]", r"expected a JSON object .* got a list"),
    (b'{"weight_map": ["model.safetensors"]}', r"field 'weight_map' must be an object \{tensor name: shard file name\}"),
    (b'{"metadata": {}}', r"field 'weight_map' must be an object .* got no such field"),
])
def test_corrupt_safetensors_index_names_the_file(tmp_path, index, match):
  write_config(tmp_path, QWEN3)
  (tmp_path / "model.safetensors.index.json").write_bytes(index)
  unchanged_after(tmp_path / "model.safetensors.index.json", hf.ModelFileError,
                  rf"model.safetensors.index.json: {match}", lambda: hf.load(str(tmp_path)))


def tokenizer_folder(path, tokenizer_config=None, jinja=None):
  """Returns a folder with the built-in tokenizer.json, and the given tokenizer_config.json / chat_template.jinja."""
  from dreamjax.data import builtin  # pylint: disable=g-import-not-at-top

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(builtin.TOKENIZER, "tokenizer.json"), "rb") as f:
    (path / "tokenizer.json").write_bytes(f.read())
  if tokenizer_config is not None:
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  if jinja is not None:
    (path / "chat_template.jinja").write_text(jinja)
  return str(path)


@pytest.mark.parametrize("corrupt", [
    lambda data: data[: len(data) // 2],  # an interrupted download
    lambda data: b"\x89\xff\x00" + data[3:],  # binary bytes
    lambda data: b"[]",
])
def test_corrupt_tokenizer_json_names_the_file(tmp_path, corrupt):
  folder = tokenizer_folder(tmp_path)
  path = tmp_path / "tokenizer.json"
  path.write_bytes(corrupt(path.read_bytes()))
  unchanged_after(path, M.ConfigError, rf"{path}: cannot be read as a tokenizer", lambda: hf.load_tokenizer(folder))


@pytest.mark.parametrize("data,match", [
    (b"\xff\xfe{}", r"tokenizer_config.json: not UTF-8 text"),
    (b'["<|im_end|>"]', r"tokenizer_config.json: expected a JSON object .* got a list"),
    (b'{"eos_token": 2}', r"tokenizer_config.json: field 'eos_token' must be a token string"),
    (b'{"pad_token": {"id": 0}}', r"tokenizer_config.json: field 'pad_token' must be a token string"),
    (b'{"chat_template": 7}', r"tokenizer_config.json: field 'chat_template' must be a template string"),
    (b'{"chat_template": [{"name": "default"}]}', r"tokenizer_config.json: field 'chat_template': a list must hold \{\"name\": string"),
])
def test_bad_tokenizer_config_names_the_file_and_field(tmp_path, data, match):
  from dreamjax.data import jsonl, tokenize  # pylint: disable=g-import-not-at-top

  folder = tokenizer_folder(tmp_path)
  (tmp_path / "tokenizer_config.json").write_bytes(data)
  unchanged_after(tmp_path / "tokenizer_config.json", jsonl.DataError, rf"{tmp_path}/{match}",
                  lambda: tokenize.TextTokenizer.from_folder(folder))


# --------------------------------------------------------------------------------------------
# Chat templates: found where transformers finds them.

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# What transformers 5 save_pretrained writes to chat_template.jinja: a file with newlines (trim_blocks applies).
BRACKETS = ("{% for message in messages %}\n[{{ message['role'] }}] {{ message['content'] }}|\n{% endfor %}\n"
            "{% if add_generation_prompt %}\n[assistant] {% endif %}")
TOOLS = "{% for message in messages %}<tool>{{ message['content'] }}{% endfor %}"


def rendered(folder):
  """Returns (context, chosen) text of one conversational example tokenised with the folder's tokenizer."""
  from dreamjax.data import jsonl, tokenize  # pylint: disable=g-import-not-at-top

  tok = tokenize.TextTokenizer.from_folder(folder)
  ex = jsonl.parse_preference({"prompt": [{"role": "user", "content": "hi"}],
                               "chosen": [{"role": "assistant", "content": "yes"}],
                               "rejected": [{"role": "assistant", "content": "no"}]}, "f:1")
  t = tokenize.encode_preference(ex, tok, 97, 97)
  return tok.tokenizer.decode(t.context, skip_special_tokens=False), tok.tokenizer.decode(t.chosen,
                                                                                        skip_special_tokens=False)


CHATML_RESULT = ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "yes<|im_end|>\n")
BRACKETS_RESULT = ("[user] hi|\n[assistant] ", "yes|\n")


@pytest.mark.parametrize("tokenizer_config,jinja,expected", [
    ({"eos_token": "<|im_end|>"}, BRACKETS, BRACKETS_RESULT),  # transformers 5: the template in its own file
    (None, BRACKETS, BRACKETS_RESULT),  # no tokenizer_config.json at all
    ({"chat_template": CHATML}, None, CHATML_RESULT),  # older transformers: the config field
    ({"chat_template": CHATML}, BRACKETS, BRACKETS_RESULT),  # both: the .jinja file wins, as in transformers
    ({"chat_template": [{"name": "tool_use", "template": TOOLS}, {"name": "default", "template": CHATML}]}, None,
     CHATML_RESULT),  # named templates: the 'default' one
    ({"chat_template": {"default": BRACKETS, "tool_use": TOOLS}}, None, BRACKETS_RESULT),
])
def test_chat_template_is_found_where_transformers_finds_it(tmp_path, tokenizer_config, jinja, expected):
  assert rendered(tokenizer_folder(tmp_path, tokenizer_config, jinja)) == expected


def test_chat_template_errors_name_the_file(tmp_path):
  from dreamjax.data import jsonl  # pylint: disable=g-import-not-at-top

  named = {"chat_template": [{"name": "tool_use", "template": TOOLS}, {"name": "rag", "template": TOOLS}]}
  with pytest.raises(jsonl.DataError, match=rf"{tmp_path}/a/tokenizer_config.json: field 'chat_template' names "
                                            r"templates \['rag', 'tool_use'\] but none is named 'default'"):
    rendered(tokenizer_folder(tmp_path / "a", named))
  assert rendered(tokenizer_folder(tmp_path / "b", named, BRACKETS)) == BRACKETS_RESULT  # the .jinja still wins
  with pytest.raises(jsonl.DataError, match=r"f:1: conversational example, but .*/c has no chat template \(neither "
                                            r"chat_template.jinja nor a 'chat_template' in tokenizer_config.json\)"):
    rendered(tokenizer_folder(tmp_path / "c", {"eos_token": "<|im_end|>"}))
  folder = tokenizer_folder(tmp_path / "d", {}, "")
  (tmp_path / "d" / "chat_template.jinja").write_bytes(b"\xff{{ x }}")
  with pytest.raises(jsonl.DataError, match=r"d/chat_template.jinja: not UTF-8 text \(at byte offset 0\)"):
    rendered(folder)


def test_chat_template_renders_in_the_transformers_environment(tmp_path):
  """Loop controls, a tojson that keeps '<', '&' and non-ASCII as they are, and {% generation %}:
  what transformers' apply_chat_template provides and real templates (Qwen tool calls) use."""
  from dreamjax.data import jsonl, tokenize  # pylint: disable=g-import-not-at-top

  template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
              "{% if m.role == 'assistant' %}{% generation %}A:{{ m.content | tojson }}{% endgeneration %}"
              "{% else %}U:{{ m.content | tojson }}{% endif %};{% endfor %}")
  tok = tokenize.TextTokenizer.from_folder(tokenizer_folder(tmp_path, {}, template))
  msgs = [{"role": "user", "content": "<a&b> 'é'"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": "never shown"}]
  assert tok.render_chat(msgs, add_generation_prompt=False) == 'U:"<a&b> \'é\'";A:"ok";'
  broken = tokenize.TextTokenizer.from_folder(tokenizer_folder(tmp_path / "b", {}, "{% for m in messages %}"))
  with pytest.raises(jsonl.DataError, match=r"f:1: chat template of .*/b failed: line 1: Unexpected end of template"):
    broken.render_chat(msgs, add_generation_prompt=True, where="f:1")
