"""ModelConfig: Qwen3 (dense) and Qwen3.5 (hybrid Gated DeltaNet) decoders, from HF or presets."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

FULL = "full_attention"
LINEAR = "linear_attention"
ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise")  # see dreamjax.model.attention


class ConfigError(ValueError):
  """config.json is missing, malformed or describes an unsupported model."""


def read_json_object(path: str, error: type = ConfigError) -> dict:
  """Returns the JSON object in the file at `path`; raises `error` naming the file otherwise.

  A UTF-8 byte-order mark is accepted (some Windows editors write one); bytes that are not UTF-8,
  malformed JSON and a top-level value that is not an object are refused with what was expected.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise error(f"{path}: cannot be read ({e.strerror or e})") from None
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise error(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); expected a JSON "
                "object (is it a binary file, or saved in another encoding?)") from None
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
  if not isinstance(raw, dict):
    raise error(f"{path}: expected a JSON object {{...}} at the top level, got {_kind(raw)}")
  return raw


def _kind(value) -> str:
  """Returns a JSON value's type as a reader knows it: 'a string', 'null', 'a list', ..."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "a boolean"
  names = {str: "a string", int: "an integer", float: "a float", list: "a list", dict: "an object"}
  return names.get(type(value), type(value).__name__)


def _shown(value) -> str:
  """Returns a short display of a bad value and its JSON type, e.g. "'big' (a string)"."""
  text = json.dumps(value) if not isinstance(value, str) else repr(value)
  return f"{text[:60]}{'…' if len(text) > 60 else ''} ({_kind(value)})"


_REQUIRED = object()


class _Fields:
  """Typed reads of a decoded config.json: each error names the file and the field and says what was expected.

  `prefix` is how the fields are spelled to the reader, e.g. 'rope_parameters.' for a nested object.
  """

  def __init__(self, raw: dict, source: str, model_type: str, prefix: str = ""):
    self.raw, self.source, self.model_type, self.prefix = raw, source, model_type, prefix

  def _get(self, name, default):
    value = self.raw.get(name)
    if value is None and default is _REQUIRED:
      if name not in self.raw:
        raise ConfigError(f"{self.source}: missing field '{self.prefix}{name}' (required for model_type "
                          f"{self.model_type!r})")
      raise ConfigError(f"{self.source}: field '{self.prefix}{name}' is null; expected a value (required for "
                        f"model_type {self.model_type!r})")
    return value

  def _bad(self, name, value, expected):
    return ConfigError(f"{self.source}: field '{self.prefix}{name}' must be {expected}, got {_shown(value)}")

  def int(self, name, default=_REQUIRED, minimum: int = 1):
    """Returns an integer field ≥ minimum (a float, even 48.0, is refused: torch shapes need ints)."""
    value = self._get(name, default)
    if value is None:
      return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise self._bad(name, value, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
    return value

  def number(self, name, default=_REQUIRED, at_most: Optional[float] = None):
    """Returns a positive number field as a float (integers accepted)."""
    value = self._get(name, default)
    if value is None:
      return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (at_most is not None and value > at_most):
      raise self._bad(name, value, "a positive number" + (f" <= {at_most}" if at_most is not None else ""))
    return float(value)

  def bool(self, name, default: bool):
    value = self._get(name, default)
    if value is None:
      return default
    if not isinstance(value, bool):
      raise self._bad(name, value, "true or false")
    return value

  def token_ids(self, name) -> tuple[int, ...]:
    """Returns a token-id field (an integer, a list of integers, or null) as a tuple."""
    value = self.raw.get(name)
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
      raise self._bad(name, value, "a token id (an integer >= 0), a list of them, or null")
    return tuple(ids)

  def token_id(self, name) -> Optional[int]:
    value = self.raw.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
      raise self._bad(name, value, "a token id (an integer >= 0) or null")
    return value

  def object(self, name) -> dict:
    value = self.raw.get(name)
    if value is not None and not isinstance(value, dict):
      raise self._bad(name, value, "an object {...} or null")
    return value or {}

  def strings(self, name) -> Optional[tuple[str, ...]]:
    value = self.raw.get(name)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
      raise self._bad(name, value, "a list of strings or null")
    return None if value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder; hashable, so it can be a jit static argument."""

  model_type: str  # 'qwen3' (dense) or 'qwen3_5_text' (hybrid DeltaNet + gated attention)
  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F, SwiGLU width
  num_layers: int  # L
  num_heads: int  # H, query heads of full-attention layers
  num_kv_heads: int  # KV heads (GQA: H % KV == 0)
  head_dim: int  # per-head width of full-attention layers
  rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm (not of the DeltaNet q/k L2 norm: fixed 1e-6)
  rope_theta: float = 1_000_000.0  # RoPE base θ: angle of dim pair i at position p is p·θ^(−2i/rotary_dim)
  partial_rotary_factor: float = 1.0  # fraction of head_dim that RoPE rotates (Qwen3.5: 0.25)
  tie_embeddings: bool = False  # lm_head is embed.T when True
  layer_types: tuple[str, ...] = ()  # per layer: 'full_attention' | 'linear_attention'
  attn_output_gate: bool = False  # Qwen3.5 full attention: out * sigmoid(gate), gate from q_proj
  norm_zero_centered: bool = False  # RMSNorm weight used as (1 + w) (Qwen3.5) instead of w
  # Gated DeltaNet (linear_attention layers) sizes:
  linear_num_key_heads: int = 0  # Hk, query/key heads
  linear_num_value_heads: int = 0  # Hv, value heads (Hv % Hk == 0)
  linear_key_head_dim: int = 0  # dk
  linear_value_head_dim: int = 0  # dv
  linear_conv_kernel: int = 4  # causal depthwise conv width
  chunk_size: int = 64  # chunk length of the parallel delta-rule form (numerics only; not an HF field)
  bos_token_id: Optional[int] = None  # beginning-of-sequence id, if the tokenizer uses one
  eos_token_ids: tuple[int, ...] = ()  # stop tokens for sampling
  pad_token_id: Optional[int] = None  # id written into padded slots (never attended to)
  max_position_embeddings: int = 32768  # trained context length (informational; RoPE has no table)
  # How the model runs, not what it computes (not HF fields; results agree to float round-off):
  attention_impl: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS ('auto': chosen by platform)
  attention_block: int = 0  # query/key block of the blockwise attention; 0: by platform (CPU 256, else 512)
  prefill_chunk: int = 4096  # a frozen context / prompt is encoded this many tokens at a time (0: at once)
  scan_layers: bool = True  # run the layers as a lax.scan over repeating blocks (False: a Python loop)

  IMPLEMENTATION_FIELDS = ("attention_impl", "attention_block", "prefill_chunk", "scan_layers")

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
    if len(self.layer_types) != self.num_layers:
      raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}")
    for t in self.layer_types:
      if t not in (FULL, LINEAR):
        raise ConfigError(f"layer_types: unknown layer type {t!r}; expected {FULL!r} or {LINEAR!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads {self.num_heads} (HF 'num_attention_heads') is not a multiple of num_kv_heads "
                        f"{self.num_kv_heads} (HF 'num_key_value_heads')")
    if LINEAR in self.layer_types:
      if self.linear_num_key_heads < 1 or self.linear_num_value_heads % self.linear_num_key_heads:
        raise ConfigError(
            f"linear_num_value_heads {self.linear_num_value_heads} must be a positive multiple of "
            f"linear_num_key_heads {self.linear_num_key_heads}"
        )

    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(f"attention_impl: {self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if self.attention_block < 0 or self.prefill_chunk < 0:
      raise ConfigError(f"attention_block ({self.attention_block}) and prefill_chunk ({self.prefill_chunk}) "
                        "must be >= 0 (0: the default)")

  @property
  def block_pattern(self) -> tuple[str, ...]:
    """The shortest run of layer types that repeats to make the stack (the scan's body).

    Qwen3: (full,); Qwen3.5: (linear, linear, linear, full); a stack that repeats nothing is its
    own pattern (one block).
    """
    n = self.num_layers
    for p in range(1, n + 1):
      if n % p == 0 and all(self.layer_types[i] == self.layer_types[i % p] for i in range(n)):
        return self.layer_types[:p]
    return self.layer_types

  @property
  def num_blocks(self) -> int:
    """How many times `block_pattern` repeats: the length of the layer scan."""
    return self.num_layers // len(self.block_pattern)

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """The layer kinds present, in a fixed order (full attention first): the stacks of params['layers']."""
    return tuple(k for k in (FULL, LINEAR) if k in self.layer_types)

  def architecture(self) -> dict[str, Any]:
    """Returns the fields that decide the parameters and the function computed (no implementation fields)."""
    d = dataclasses.asdict(self)
    for k in self.IMPLEMENTATION_FIELDS:
      d.pop(k)
    return d

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def linear_key_dim(self) -> int:
    return self.linear_num_key_heads * self.linear_key_head_dim

  @property
  def linear_value_dim(self) -> int:
    return self.linear_num_value_heads * self.linear_value_head_dim

  @property
  def linear_conv_dim(self) -> int:
    return 2 * self.linear_key_dim + self.linear_value_dim

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ----------------------------------------------------------------------------------------------

  @classmethod
  def preset(cls, name: str) -> "ModelConfig":
    """Returns a tiny built-in config: 'qwen3-tiny' or 'qwen3_5-tiny' (odd sizes, CPU-fast)."""
    if name not in PRESETS:
      raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]

  @classmethod
  def from_hf(cls, folder: str) -> "ModelConfig":
    """Returns the config of a local Hugging Face folder (config.json of qwen3 / qwen3_5[_text])."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
      raise ConfigError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return cls.from_hf_dict(read_json_object(path), source=path)

  @classmethod
  def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
    """Returns the config described by a decoded HF config.json; ConfigError names the field otherwise."""
    model_type = raw.get("model_type")
    if model_type == "qwen3_5":
      if raw.get("text_config") is None:
        raise ConfigError(f"{source}: model_type 'qwen3_5' without field 'text_config'")
      if not isinstance(raw["text_config"], dict):
        raise ConfigError(f"{source}: field 'text_config' must be an object {{...}}, got {_shown(raw['text_config'])}")
      raw, source = dict(raw["text_config"]), f"{source} (text_config)"
      raw.setdefault("model_type", "qwen3_5_text")
      model_type = raw["model_type"]
    if model_type not in ("qwen3", "qwen3_5_text"):
      raise ConfigError(
          f"{source}: field 'model_type' is {model_type!r}; supported: 'qwen3', 'qwen3_5_text', 'qwen3_5'"
      )
    field = _Fields(raw, source, model_type)
    rope_name = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    rope = field.object(rope_name)
    rope_field = _Fields(rope, source, model_type, prefix=rope_name + ".")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ConfigError(f"{source}: field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' is supported")
    if rope.get("rope_theta") is None and raw.get("rope_theta") is None:
      raise ConfigError(f"{source}: missing field 'rope_theta' (top level or in 'rope_parameters')")
    rope_theta = rope_field.number("rope_theta") if rope.get("rope_theta") is not None else field.number("rope_theta")
    if raw.get("attention_bias"):
      raise ConfigError(f"{source}: field 'attention_bias' is true; biased attention projections are not supported")
    if raw.get("use_sliding_window"):
      raise ConfigError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not supported")
    if raw.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: field 'hidden_act' is {raw['hidden_act']!r}; only 'silu' is supported")
    num_layers = field.int("num_hidden_layers")
    hidden = field.int("hidden_size")
    heads = field.int("num_attention_heads")
    common = dict(
        model_type=model_type,
        vocab_size=field.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=field.int("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=field.int("num_key_value_heads", heads),
        head_dim=field.int("head_dim", hidden // heads),
        rms_norm_eps=field.number("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        tie_embeddings=field.bool("tie_word_embeddings", False),
        bos_token_id=field.token_id("bos_token_id"),
        eos_token_ids=field.token_ids("eos_token_id"),
        pad_token_id=field.token_id("pad_token_id"),
        max_position_embeddings=field.int("max_position_embeddings", 32768),
    )
    if model_type == "qwen3":
      return cls._checked(source, **common, partial_rotary_factor=1.0)
    layer_types = field.strings("layer_types")
    if layer_types is None:
      interval = field.int("full_attention_interval", 4)
      layer_types = tuple(LINEAR if (i + 1) % interval else FULL for i in range(num_layers))
    rotary = rope_field if rope.get("partial_rotary_factor") is not None else field
    return cls._checked(
        source,
        **common,
        partial_rotary_factor=rotary.number("partial_rotary_factor", 0.25, at_most=1.0),
        layer_types=layer_types,
        attn_output_gate=True,
        norm_zero_centered=True,
        linear_num_key_heads=field.int("linear_num_key_heads"),
        linear_num_value_heads=field.int("linear_num_value_heads"),
        linear_key_head_dim=field.int("linear_key_head_dim"),
        linear_value_head_dim=field.int("linear_value_head_dim"),
        linear_conv_kernel=field.int("linear_conv_kernel_dim", 4),
    )

  @classmethod
  def _checked(cls, source: str, **kw) -> "ModelConfig":
    """Returns cls(**kw); a ConfigError of the consistency checks names the file it came from."""
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """Returns a config.json dict that transformers loads as this model."""
    common = {
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": self.tie_embeddings,
        "attention_bias": False,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32",
    }
    if self.model_type == "qwen3":
      return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "rope_theta": self.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta}, **common}
    return {
        "model_type": "qwen3_5_text",
        "architectures": ["Qwen3_5ForCausalLM"],
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                            "partial_rotary_factor": self.partial_rotary_factor},
        "layer_types": list(self.layer_types),
        "linear_num_key_heads": self.linear_num_key_heads,
        "linear_num_value_heads": self.linear_num_value_heads,
        "linear_key_head_dim": self.linear_key_head_dim,
        "linear_value_head_dim": self.linear_value_head_dim,
        "linear_conv_kernel_dim": self.linear_conv_kernel,
        **common,
    }


PRESETS = {
    "qwen3-tiny": ModelConfig(
        model_type="qwen3", vocab_size=263, hidden_size=48, intermediate_size=88, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=12, rope_theta=10_000.0, eos_token_ids=(2,), bos_token_id=1,
        pad_token_id=0,
    ),
    "qwen3_5-tiny": ModelConfig(
        model_type="qwen3_5_text", vocab_size=263, hidden_size=48, intermediate_size=88, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0, partial_rotary_factor=0.25,
        # Both kinds, and a DeltaNet layer after full attention (whose pad outputs it must re-mask).
        layer_types=(LINEAR, FULL, LINEAR), attn_output_gate=True, norm_zero_centered=True,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=10,
        linear_conv_kernel=4, chunk_size=16, eos_token_ids=(2,), bos_token_id=1, pad_token_id=0,
    ),
}
