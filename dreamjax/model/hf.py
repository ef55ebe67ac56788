"""Hugging Face interop: safetensors ↔ params (per tensor), tokenizer.json, config.json.

Loading streams one tensor at a time from `safe_open` (single file or a sharded
`model.safetensors.index.json`), converts its layout and dtype, and hands it to an optional
`place(path, array)` callback (e.g. `jax.device_put` onto that parameter's sharding) before the
next tensor is read, so host memory never holds more than one tensor of the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from dreamjax.model import layout
from dreamjax.model.config import FULL, ConfigError, ModelConfig, read_json_object

# HF prefixes of the text decoder: Qwen3ForCausalLM / Qwen3_5ForCausalLM use "model.", the
# multimodal Qwen3_5ForConditionalGeneration checkpoints use "model.language_model.".
_PREFIXES = ("model.language_model.", "model.")
_IGNORED_PREFIXES = ("model.visual.", "visual.", "mtp.")  # vision tower, multi-token prediction


class ModelFileError(ValueError):
  """A model folder's weights are missing, incomplete, corrupt or do not match its config."""


# What an exported folder's tensors (and config.json's 'dtype') may be: the floating dtypes that
# transformers loads (torch.float32 / bfloat16 / float16).
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _safe_open(fname: str, framework: str):
  """Returns `safe_open(fname)`; a truncated or corrupt file raises ModelFileError naming it."""
  try:
    return safe_open(fname, framework=framework)
  except (SafetensorError, OSError) as e:
    raise ModelFileError(f"{fname}: not a readable safetensors file ({e}); it may be truncated or corrupt "
                          "(an interrupted download or copy): fetch or export it again") from None


def _entries(config: ModelConfig) -> Iterator[tuple[tuple, Optional[int], str, str, tuple]]:
  """Yields (param path, layer slot or None, HF name without prefix, layout kind, our shape) per tensor.

  A layer tensor's path is its stacked leaf ('layers', kind, ...) and the slot its index in that
  stack (dreamjax.model.layout); the shape is one layer's.
  """
  d, f = config.hidden_size, config.intermediate_size
  yield ("embed",), None, "embed_tokens.weight", "same", (config.vocab_size, d)
  yield ("final_norm",), None, "norm.weight", "same", (d,)
  for i, kind in enumerate(config.layer_types):
    pre, lp, j = f"layers.{i}.", (layout.LAYERS, kind), layout.kind_index(config, i)[1]
    yield lp + ("input_norm",), j, pre + "input_layernorm.weight", "same", (d,)
    yield lp + ("post_attention_norm",), j, pre + "post_attention_layernorm.weight", "same", (d,)
    for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
      yield lp + ("mlp", name), j, f"{pre}mlp.{name}.weight", "linear", shape
    if kind == FULL:
      h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
      qw = h * hd * (2 if config.attn_output_gate else 1)
      for name, shape in (("q_proj", (d, qw)), ("k_proj", (d, kv * hd)), ("v_proj", (d, kv * hd)),
                          ("o_proj", (h * hd, d))):
        yield lp + ("attn", name), j, f"{pre}self_attn.{name}.weight", "linear", shape
      for name in ("q_norm", "k_norm"):
        yield lp + ("attn", name), j, f"{pre}self_attn.{name}.weight", "same", (hd,)
    else:
      hv, la = config.linear_num_value_heads, lp + ("linear_attn",)
      for name, shape in (("in_proj_qkv", (d, config.linear_conv_dim)), ("in_proj_z", (d, config.linear_value_dim)),
                          ("in_proj_b", (d, hv)), ("in_proj_a", (d, hv)), ("out_proj", (config.linear_value_dim, d))):
        yield la + (name,), j, f"{pre}linear_attn.{name}.weight", "linear", shape
      yield (la + ("conv_weight",), j, f"{pre}linear_attn.conv1d.weight", "conv",
             (config.linear_conv_kernel, config.linear_conv_dim))
      yield la + ("A_log",), j, f"{pre}linear_attn.A_log", "same", (hv,)
      yield la + ("dt_bias",), j, f"{pre}linear_attn.dt_bias", "same", (hv,)
      yield la + ("norm",), j, f"{pre}linear_attn.norm.weight", "same", (config.linear_value_head_dim,)
  if not config.tie_embeddings:
    yield ("lm_head",), None, "lm_head.weight", "linear", (d, config.vocab_size)


def _to_ours(x, kind):
  if kind == "linear":
    return x.T
  if kind == "conv":  # HF (C, 1, K) depthwise Conv1d -> (K, C)
    return x[:, 0, :].T
  return x


def _to_hf(x, kind):
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.T[:, None, :]
  return x


def _weight_files(folder: str) -> dict[str, str]:
  """Returns {tensor name: file} for a single-file or sharded safetensors checkpoint."""
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.isfile(index):
    weight_map = read_json_object(index, ModelFileError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ModelFileError(f"{index}: field 'weight_map' must be an object {{tensor name: shard file name}}, "
                            f"got {'no such field' if weight_map is None else json.dumps(weight_map)[:60]}")
    for fname in set(weight_map.values()):
      if not os.path.isfile(os.path.join(folder, fname)):
        raise ModelFileError(f"{index}: shard {fname!r} is listed but missing from {folder}")
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}
  if os.path.isfile(single):
    with _safe_open(single, "numpy") as f:
      return {k: single for k in f.keys()}
  raise ModelFileError(f"{folder}: no model.safetensors or model.safetensors.index.json (no weights found)")


def _host():
  """Returns a context that makes new arrays land on the host CPU (no-op where there is none).

  safetensors' flax reader (the one that handles bfloat16) creates a jax array on the default
  device; staging on the CPU instead means a tensor reaches an accelerator only through `place`,
  straight onto its sharding, never first whole on device 0.
  """
  try:
    return jax.default_device(jax.devices("cpu")[0])
  except RuntimeError:  # JAX_PLATFORMS without cpu
    return contextlib.nullcontext()


def _set(tree, path, value):
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _by_leaf(config: ModelConfig) -> dict[tuple, list]:
  """Returns {param path: [(slot, HF name, layout kind, one tensor's shape), ...]} in _entries order."""
  leaves: dict[tuple, list] = {}
  for path, slot, name, kind, shape in _entries(config):
    leaves.setdefault(path, []).append((slot, name, kind, shape))
  return leaves


def load_params(
    folder: str,
    config: Optional[ModelConfig] = None,
    dtype=jnp.float32,
    place: Optional[Callable[[tuple, jax.Array], jax.Array]] = None,
) -> dict:
  """Returns params read from a HF folder, one tensor at a time, cast to `dtype`.

  A stacked layer leaf (dreamjax.model.layout) is assembled on the host from its layers'
  tensors and handed on whole, so host memory holds at most one stacked leaf (e.g. every
  attention layer's q_proj) besides the tensor being read.

  Args:
    place: optional `(path, array) -> array` called on each leaf as soon as it is assembled, with
      its params path, e.g. `('layers', 'full_attention', 'attn', 'q_proj')` or `('embed',)`, and
      the array (in our layout and `dtype`, on the host CPU), e.g.
      `lambda path, x: jax.device_put(x, sharding_for(path))`; default: the default device.
  """
  config = config or ModelConfig.from_hf(folder)
  files = _weight_files(folder)
  by_name = {}
  for full in files:
    if full.startswith(_IGNORED_PREFIXES):
      continue
    short = full
    for p in _PREFIXES:
      if full.startswith(p):
        short = full[len(p) :]
        break
    by_name[short] = full
  params: dict = {}
  expected = set()
  handles = {}

  def read(path, name, kind, shape):
    if name not in by_name:
      raise ModelFileError(f"{folder}: tensor '{name}' is missing from the checkpoint (needed for {path})")
    full = by_name[name]
    fname = files[full]
    if fname not in handles:
      handles[fname] = _safe_open(fname, "flax")
    try:
      x = handles[fname].get_tensor(full)
    except (SafetensorError, OSError) as e:
      raise ModelFileError(f"{fname}: tensor '{full}' cannot be read ({e}); the file may be corrupt") from None
    hf_shape = tuple(_to_hf(np.empty(shape, np.int8), kind).shape)
    if tuple(x.shape) != hf_shape:
      raise ModelFileError(
          f"{fname}: tensor '{full}' has shape {tuple(x.shape)}; the config expects {hf_shape} "
          f"(ours: {shape} for {path})"
      )
    return _to_ours(x, kind).astype(dtype)

  try:
    for path, members in _by_leaf(config).items():
      expected.update(name for _, name, _, _ in members)
      with _host():  # read, transpose, cast and stack on the host CPU; `place` moves it on
        parts = [read(path, name, kind, shape) for _, name, kind, shape in members]
        x = parts[0] if members[0][0] is None else jnp.stack(parts)
        del parts
      x = place(path, x) if place is not None else jax.device_put(x, jax.devices()[0])
      _set(params, path, x)
  finally:
    handles.clear()
  extra = sorted(set(by_name) - expected)
  if config.tie_embeddings:
    extra = [e for e in extra if e != "lm_head.weight"]  # tied checkpoints may still store it
  if extra:
    where = sorted({files[by_name[e]] for e in extra})
    raise ModelFileError(
        f"{', '.join(where)}: unexpected tensors not in the config: {extra[:5]}{' …' if len(extra) > 5 else ''}")
  return params


def save_hf(folder: str, params: dict, config: ModelConfig, max_shard_bytes: int = 4 << 30,
            dtype: Optional[str] = None) -> None:
  """Writes config.json and safetensors (sharded with an index past max_shard_bytes) to `folder`.

  Tensors are gathered one layer at a time into the current shard; transformers loads the folder
  with `AutoModelForCausalLM.from_pretrained`. Nothing is written if a tensor cannot be cast.

  Args:
    dtype: one of EXPORT_DTYPES, the dtype of the written tensors and config.json's 'dtype' (and
      the older 'torch_dtype'); default: the params' own dtype (that of params['embed']).
  """
  from safetensors.numpy import save_file

  dtype = dtype if dtype is not None else np.dtype(params["embed"].dtype).name
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
  out_dtype = np.dtype(_NUMPY_DTYPES[dtype])
  shards, current, size = [], {}, 0
  for path, slot, name, kind, _ in _entries(config):
    node = _get(params, path)
    x = np.asarray(jax.device_get(node if slot is None else node[slot]))  # bfloat16 stays bfloat16
    x = np.ascontiguousarray(_to_hf(_cast(x, out_dtype, name), kind))
    if current and size + x.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current["model." + name if name != "lm_head.weight" else name] = x
    size += x.nbytes
  shards.append(current)
  os.makedirs(folder, exist_ok=True)
  index = os.path.join(folder, "model.safetensors.index.json")
  if len(shards) == 1:
    if os.path.exists(index):  # a stale index would take precedence over the new single file
      os.remove(index)
    save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
      weight_map.update({k: fname for k in shard})
    with open(index, "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
  raw = config.to_hf_dict()
  raw["torch_dtype"] = raw["dtype"] = out_dtype.name  # transformers 5 reads 'dtype', older ones 'torch_dtype'
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(raw, f, indent=1)


def _cast(x: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
  """Returns x as `dtype` (round to nearest even); refuses finite values that overflow to ±inf."""
  if x.dtype == dtype:
    return x
  with np.errstate(over="ignore"):
    y = x.astype(dtype)
  if not np.isfinite(y).all() and np.isfinite(x).all():
    big = float(np.max(np.abs(x.astype(np.float32))))
    raise ModelFileError(f"tensor '{name}': max |value| {big:.4g} overflows {dtype.name} "
                          f"(largest finite {float(ml_dtypes.finfo(dtype).max):.4g}); export as bfloat16 or float32")
  return y


def declared_dtype(folder: str) -> Optional[str]:
  """Returns the parameter dtype a HF folder's config.json declares ('dtype', else 'torch_dtype'), or None.

  transformers 5 writes 'dtype', older versions 'torch_dtype'; a multimodal wrapper may declare it
  in its 'text_config' only. The value is returned as written (e.g. 'bfloat16'), unchecked.
  """
  path = os.path.join(folder, "config.json")
  raw = read_json_object(path)
  text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
  for where, d in (("", raw), ("text_config.", text)):
    for key in ("dtype", "torch_dtype"):
      if d.get(key) is not None:
        if not isinstance(d[key], str):
          raise ConfigError(f"{path}: field '{where}{key}' must be a dtype name such as 'bfloat16', got {d[key]!r}")
        return d[key]
  return None


def load_tokenizer(folder: str):
  """Returns the `tokenizers.Tokenizer` of a model folder's tokenizer.json."""
  from tokenizers import Tokenizer

  path = os.path.join(folder, "tokenizer.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{folder}: no tokenizer.json (expected a Hugging Face tokenizer file)")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed files
    raise ConfigError(f"{path}: cannot be read as a tokenizer: {e}") from None


def load(folder: str, dtype=jnp.float32, place=None) -> tuple[ModelConfig, dict]:
  """Returns (config, params) of a local HF model folder."""
  config = ModelConfig.from_hf(folder)
  return config, load_params(folder, config, dtype=dtype, place=place)
