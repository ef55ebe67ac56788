"""Cache: the frozen-context state that sampling and context-frozen training continue from.

One entry per layer: attention layers hold K/V in `capacity` slots; Gated DeltaNet layers hold the
recurrent state and the causal-conv tail. All rows of a batch share the write index `end` (contexts
are left-padded so they end at the same slot); `valid_BxS` marks which slots hold real tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from dreamjax.model.config import FULL, ModelConfig


class AttentionCache(NamedTuple):
  """K/V of a full-attention layer (RoPE already applied to K)."""

  k_BxSxKxH: jax.Array  # S = capacity slots, K = kv heads, H = head_dim
  v_BxSxKxH: jax.Array


class DeltaNetCache(NamedTuple):
  """State of a Gated DeltaNet layer."""

  state_BxHxKxV: jax.Array  # float32 recurrent state S per value head (H = Hv, K = dk, V = dv)
  conv_BxKm1xC: jax.Array  # last K−1 real (unpadded) conv inputs, oldest first (C = 2·Hk·dk + Hv·dv)


LayerCache = Union[AttentionCache, DeltaNetCache]


class Cache(NamedTuple):
  """Per-layer caches plus the slot bookkeeping shared by all attention layers."""

  layers: tuple  # tuple[LayerCache, ...], one per layer
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
  layers = []
  for kind in config.layer_types:
    if kind == FULL:
      shape = (batch, capacity, config.num_kv_heads, config.head_dim)
      layers.append(AttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    else:
      layers.append(DeltaNetCache(
          jnp.zeros((batch, config.linear_num_value_heads, config.linear_key_head_dim,
                     config.linear_value_head_dim), jnp.float32),
          jnp.zeros((batch, config.linear_conv_kernel - 1, config.linear_conv_dim), dtype),
      ))
  return Cache(tuple(layers), jnp.zeros((batch, capacity), bool), jnp.zeros((), jnp.int32))


def broadcast_cache(cache: Cache, k: int) -> Cache:
  """Returns the cache with each row repeated k times (row b → rows b·k … b·k+k−1).

  One context encoded once serves k continuations (e.g. chosen and rejected, or k samples);
  the context computation is not redone, only its state is copied.
  """
  rep = lambda x: jnp.repeat(x, k, axis=0) if x.ndim > 0 else x
  return jax.tree.map(rep, cache)


def grow_cache(cache: Cache, capacity: int) -> Cache:
  """Returns the cache with `capacity` slots (≥ current), new slots empty."""
  extra = capacity - cache.capacity
  if extra < 0:
    raise ValueError(f"grow_cache: capacity {capacity} < current {cache.capacity}")
  if extra == 0:
    return cache
  pad_s = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
  layers = tuple(
      AttentionCache(pad_s(c.k_BxSxKxH), pad_s(c.v_BxSxKxH)) if isinstance(c, AttentionCache) else c
      for c in cache.layers
  )
  return Cache(layers, pad_s(cache.valid_BxS), cache.end)
