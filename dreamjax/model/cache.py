"""Cache: the frozen-context state that sampling and context-frozen training continue from.

Stacked like the params (see dreamjax.model.layout): one entry per layer kind, with a leading
layer axis. Attention layers hold K/V in `capacity` slots; Gated DeltaNet layers hold the
recurrent state and the causal-conv tail. All rows of a batch share the write index `end`
(contexts are left-padded so they end at the same slot); `valid_BxS` marks which slots hold real
tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from dreamjax.model.config import FULL, LINEAR, ModelConfig


class AttentionCache(NamedTuple):
  """K/V of full-attention layers (RoPE already applied to K).

  Shapes (L, B, S, K, H) in a Cache (L layers of this kind, S = capacity slots, K = kv heads,
  H = head_dim); (B, S, K, H) for the one layer a decoder layer sees.
  """

  k: jax.Array
  v: jax.Array


class DeltaNetCache(NamedTuple):
  """State of Gated DeltaNet layers: (L, B, …) in a Cache, (B, …) for one layer."""

  state: jax.Array  # (L, B, H, K, V) float32 recurrent state per value head (H = Hv, K = dk, V = dv)
  conv: jax.Array  # (L, B, K−1, C) last K−1 real (unpadded) conv inputs, oldest first (C = 2·Hk·dk + Hv·dv)


LayerCache = Union[AttentionCache, DeltaNetCache]


class Cache(NamedTuple):
  """Per-kind stacked layer caches plus the slot bookkeeping shared by all attention layers."""

  layers: dict  # {kind: LayerCache with a leading layer axis}, kinds as in config.layer_kinds
  valid_BxS: jax.Array  # bool: slot holds a real (non-padding) token
  end: jax.Array  # int32 scalar: next slot to write

  @property
  def capacity(self) -> int:
    return self.valid_BxS.shape[1]

  @property
  def batch_size(self) -> int:
    return self.valid_BxS.shape[0]


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> Cache:
  """Returns an empty cache for `batch` rows with room for `capacity` tokens."""
  layers = {}
  n_full, n_lin = config.layer_types.count(FULL), config.layer_types.count(LINEAR)
  if n_full:
    shape = (n_full, batch, capacity, config.num_kv_heads, config.head_dim)
    layers[FULL] = AttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  if n_lin:
    layers[LINEAR] = DeltaNetCache(
        jnp.zeros((n_lin, batch, config.linear_num_value_heads, config.linear_key_head_dim,
                   config.linear_value_head_dim), jnp.float32),
        jnp.zeros((n_lin, batch, config.linear_conv_kernel - 1, config.linear_conv_dim), dtype),
    )
  return Cache(layers, jnp.zeros((batch, capacity), bool), jnp.zeros((), jnp.int32))


def broadcast_cache(cache: Cache, k: int) -> Cache:
  """Returns the cache with each row repeated k times (row b → rows b·k … b·k+k−1).

  One context encoded once serves k continuations (e.g. chosen and rejected, or k samples);
  the context computation is not redone, only its state is copied.
  """
  layers = jax.tree.map(lambda x: jnp.repeat(x, k, axis=1), cache.layers)  # (L, B, ...)
  return Cache(layers, jnp.repeat(cache.valid_BxS, k, axis=0), cache.end)
