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
      raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
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
    try:
      with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return cls.from_hf_dict(raw, source=path)

  @classmethod
  def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
    """Returns the config described by a decoded HF config.json."""
    model_type = raw.get("model_type")
    if model_type == "qwen3_5":
      if "text_config" not in raw:
        raise ConfigError(f"{source}: model_type 'qwen3_5' without field 'text_config'")
      raw, source = dict(raw["text_config"]), f"{source} (text_config)"
      raw.setdefault("model_type", "qwen3_5_text")
      model_type = raw["model_type"]
    if model_type not in ("qwen3", "qwen3_5_text"):
      raise ConfigError(
          f"{source}: field 'model_type' is {model_type!r}; supported: 'qwen3', 'qwen3_5_text', 'qwen3_5'"
      )

    def need(field):
      if field not in raw or raw[field] is None:
        raise ConfigError(f"{source}: missing field '{field}' (required for model_type {model_type!r})")
      return raw[field]

    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ConfigError(f"{source}: field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' is supported")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta"))
    if rope_theta is None:
      raise ConfigError(f"{source}: missing field 'rope_theta' (top level or in 'rope_parameters')")
    if raw.get("attention_bias"):
      raise ConfigError(f"{source}: field 'attention_bias' is true; biased attention projections are not supported")
    if raw.get("use_sliding_window"):
      raise ConfigError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not supported")
    if raw.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: field 'hidden_act' is {raw['hidden_act']!r}; only 'silu' is supported")
    eos = raw.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    num_layers = need("num_hidden_layers")
    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    common = dict(
        model_type=model_type,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=raw.get("pad_token_id"),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
    )
    if model_type == "qwen3":
      return cls(**common, partial_rotary_factor=1.0)
    layer_types = raw.get("layer_types")
    if layer_types is None:
      interval = raw.get("full_attention_interval", 4)
      layer_types = [LINEAR if (i + 1) % interval else FULL for i in range(num_layers)]
    return cls(
        **common,
        partial_rotary_factor=float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25))),
        layer_types=tuple(layer_types),
        attn_output_gate=True,
        norm_zero_centered=True,
        linear_num_key_heads=need("linear_num_key_heads"),
        linear_num_value_heads=need("linear_num_value_heads"),
        linear_key_head_dim=need("linear_key_head_dim"),
        linear_value_head_dim=need("linear_value_head_dim"),
        linear_conv_kernel=raw.get("linear_conv_kernel_dim", 4),
    )

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
