"""The decoder: Qwen3 (dense) and Qwen3.5 (Gated DeltaNet + gated attention) as pure functions.

Params are a plain nested dict (what jit, sharding, Orbax and optax see). Decoder layers are
stacked by kind (dreamjax.model.layout): every leaf of `params['layers'][kind]` has a leading
axis over the model's layers of that kind. Every projection matrix is stored (in_features,
out_features), y = x @ W; shapes of one layer (the stacks add the layer axis in front):

    embed                      (V, D)              token embedding (also the head when tied)
    lm_head                    (D, V)              absent when tie_embeddings
    final_norm                 (D,)
    layers[kind].input_norm, .post_attention_norm  (D,)
    layers[kind].mlp.{gate_proj, up_proj} (D, F); down_proj (F, D)
    layers['full_attention'].attn:
      q_proj (D, H·hd·(2 if attn_output_gate)): per head [query hd | gate hd] (HF's interleaving)
      k_proj/v_proj (D, KV·hd), o_proj (H·hd, D), q_norm/k_norm (hd,)
    layers['linear_attention'].linear_attn (Gated DeltaNet):
      in_proj_qkv (D, 2·Hk·dk + Hv·dv): columns [q | k | v], each head-major
      in_proj_z (D, Hv·dv), in_proj_b/in_proj_a (D, Hv), out_proj (Hv·dv, D)
      conv_weight (K, 2·Hk·dk + Hv·dv): depthwise causal conv taps, row K−1 hits the current token
      A_log/dt_bias (Hv,), norm (dv,)

Names carry roles for the optimizer: APOLLO's default label function projects the matrices
(leaves of 2 dims past the layer axis) whose path has none of 'embed', 'lm_head', 'norm',
'conv', so `conv_weight` (a kernel, not a projection), the embeddings and all norms go to its
AdamW branch; vectors (norms, A_log, dt_bias) are never projected.

Norm weights are used as stored: `w` for Qwen3, `1 + w` for Qwen3.5 (config.norm_zero_centered),
except the DeltaNet output norm `linear_attn.norm`, which is always a plain `w` (as in HF).

`forward(params, tokens, positions, mask, cache=None, *, config)` returns an `Output`: without
a cache it processes the whole sequence (training); with one it writes the new tokens at
`cache.end` and continues (decoding), or, with write_cache=False, reads it as a context that k
continuations per row share (context-frozen training: chosen and rejected). `prefill` encodes a
context into a cache, `prefill_chunk` tokens at a time. The layers run as a `lax.scan` over repeats of
`config.block_pattern` (Qwen3: one layer; Qwen3.5: 3 DeltaNet + 1 attention), each block under an
optional remat policy, so compile time does not grow with depth.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.model import attention as attention_lib
from dreamjax.model import deltanet
from dreamjax.model import layout
from dreamjax.model.cache import AttentionCache, Cache, DeltaNetCache, init_cache
from dreamjax.model.config import FULL, LINEAR, ModelConfig
from dreamjax.model.shard import batch_sharded

Params = dict

# Remat policies of a scanned block (jax.checkpoint_policies): what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs
}


class Output(NamedTuple):
  """What `forward` returns; fields it was not asked for are None."""

  logits: Optional[jax.Array]  # (B, T, V) in the compute dtype; None with head=False
  cache: Optional[Cache]  # the continued cache (cache given), else None
  head_input: jax.Array  # (B, T, D): the final-normed stream the LM head reads
  hidden: Optional[jax.Array]  # (L + 1, B, T, D) residual entering each layer, then the last output
  mlp_inputs: Optional[jax.Array]  # (L, B, T, D) each layer's MLP input (normed, after attention)


class Slots(NamedTuple):
  """Where a call's tokens sit in the attention slots (shared by every attention layer)."""

  key_valid_BxS: jax.Array  # bool: slot holds a real token (S = T, or the cache's capacity)
  q_start: jax.Array  # int32 scalar: slot of the first new token (0, or the cache's end)
  continuations: int = 1  # each cache row serves this many consecutive token rows
  read_only: bool = False  # the cache is a context to read, not to continue (no new cache)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, zero_centered: bool) -> jax.Array:
  """Returns x / rms(x) · (1 + w) (zero-centred, Qwen3.5) or · w (Qwen3); computed in float32."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  scale = 1.0 + w.astype(jnp.float32) if zero_centered else w.astype(jnp.float32)
  return (y * scale).astype(x.dtype)


def rope_tables(positions_BxT: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Returns cos, sin of shape (B, T, rotary_dim): RoPE angles pos · θ^(−2i/rotary_dim), doubled."""
  dim = config.rotary_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Returns x with its first rotary_dim dims rotated (rotate-half layout), the rest passed."""
  rd = cos.shape[-1]
  xr, xp = x_BxTxNxH[..., :rd].astype(jnp.float32), x_BxTxNxH[..., rd:]
  half = rd // 2
  rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
  out = xr * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return jnp.concatenate([out.astype(x_BxTxNxH.dtype), xp], axis=-1)


def dense(x_BxTxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """Returns x @ w with the batch axis split over the mesh (FSDP: the weight is gathered)."""
  return batch_sharded(x_BxTxI @ w_IxO)


def mlp(p: Params, x: jax.Array) -> jax.Array:
  """Returns the SwiGLU MLP: down(silu(x·gate) ⊙ x·up)."""
  return dense(jax.nn.silu(dense(x, p["gate_proj"])) * dense(x, p["up_proj"]), p["down_proj"])


def dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
  """Returns inverted dropout of x: each entry zeroed with probability `rate`, the rest scaled by
  1 / (1 − rate), so E[dropout(x)] = x (Srivastava et al. 2014). rate 0 or key None: x itself."""
  if not rate or key is None:
    return x
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def stop_gradient_where(x_BxTx___: jax.Array, frozen_BxT: Optional[jax.Array]) -> jax.Array:
  """Returns x with `stop_gradient` at the (b, t) positions where frozen_BxT is true."""
  if frozen_BxT is None:
    return x_BxTx___
  f = frozen_BxT.reshape(frozen_BxT.shape + (1,) * (x_BxTx___.ndim - 2))
  return jnp.where(f, jax.lax.stop_gradient(x_BxTx___), x_BxTx___)


def attention(p, x_BxTxD, cos, sin, slots: Slots, layer_cache: Optional[AttentionCache], config: ModelConfig,
              mask_BxT=None, frozen_BxT=None):
  """Returns (output_BxTxD, new layer cache): GQA with q/k norm, RoPE and optional output gate.

  With a read-only cache (slots.read_only: a context shared by k continuations) the new cache is None.
  """
  b, t, _ = x_BxTxD.shape
  h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
  q = dense(x_BxTxD, p["q_proj"])
  if config.attn_output_gate:  # per head: [query (hd) | gate (hd)]
    q = q.reshape(b, t, h, 2 * hd)
    q, gate = q[..., :hd], q[..., hd:].reshape(b, t, h * hd)
  else:
    q, gate = q.reshape(b, t, h, hd), None
  k = dense(x_BxTxD, p["k_proj"]).reshape(b, t, kv, hd)
  v = dense(x_BxTxD, p["v_proj"]).reshape(b, t, kv, hd)
  zc = config.norm_zero_centered
  q = apply_rope(rms_norm(q, p["q_norm"], config.rms_norm_eps, zc), cos, sin)
  k = apply_rope(rms_norm(k, p["k_norm"], config.rms_norm_eps, zc), cos, sin)
  k, v = stop_gradient_where(k, frozen_BxT), stop_gradient_where(v, frozen_BxT)
  impl = dict(impl=config.attention_impl, block=config.attention_block)
  if layer_cache is not None and slots.read_only:
    out = _shared_context_attention(q, k, v, layer_cache, slots, mask_BxT, impl)
    return _attention_out(p, out, gate, x_BxTxD.dtype), None
  if layer_cache is not None:
    write = lambda buf, new: batch_sharded(
        jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), slots.q_start, axis=1))
    k_all, v_all = write(layer_cache.k, k), write(layer_cache.v, v)
    new_cache = AttentionCache(k_all, v_all)
  else:
    k_all, v_all, new_cache = k, v, None
  out = attention_lib.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), slots.key_valid_BxS,
                                            slots.q_start, **impl)
  return _attention_out(p, out, gate, x_BxTxD.dtype), new_cache


def _attention_out(p, out_BxTxNxH, gate, dtype):
  """Returns the output projection of the heads, gated per channel when the layer has a gate."""
  b, t, n, hd = out_BxTxNxH.shape
  out = out_BxTxNxH.reshape(b, t, n * hd).astype(dtype)
  if gate is not None:
    out = out * jax.nn.sigmoid(gate)
  return dense(out, p["o_proj"])


def _shared_context_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, layer_cache: AttentionCache, slots: Slots,
                              mask_BxT, impl) -> jax.Array:
  """Returns the attention of k continuations per cache row over [their context, themselves].

  The context's K/V are read once for all k continuations (queries of rows b·k … b·k+k−1 are laid
  side by side against cache row b: nothing is copied), each continuation attends to its own
  tokens causally, and the two parts combine exactly through their log-sum-exps
  (`attention.merge`). Equals writing the continuation into `broadcast_cache(cache, k)`.
  """
  b, t, n, hd = q_BxTxNxH.shape
  k = slots.continuations
  own = attention_lib.dot_product_attention(q_BxTxNxH, k_BxTxKxH.astype(q_BxTxNxH.dtype),
                                            v_BxTxKxH.astype(q_BxTxNxH.dtype), mask_BxT, 0, return_lse=True, **impl)
  if layer_cache.k.shape[1] == 0:  # an empty context (a one-token prompt)
    return own[0]
  q_ctx = q_BxTxNxH.reshape(b // k, k * t, n, hd)  # every context slot precedes every query
  out, lse = attention_lib.dot_product_attention(q_ctx, layer_cache.k.astype(q_ctx.dtype),
                                                 layer_cache.v.astype(q_ctx.dtype), slots.key_valid_BxS,
                                                 slots.q_start, return_lse=True, **impl)
  return attention_lib.merge(out.reshape(b, t, n, hd), lse.reshape(b, t, n), *own)


def gated_deltanet(p, x_BxTxD, mask_BxT, layer_cache: Optional[DeltaNetCache], config: ModelConfig, frozen_BxT=None):
  """Returns (output_BxTxD, new layer cache) of a Gated DeltaNet layer.

  beta = σ(x·W_b), g = −exp(A_log)·softplus(x·W_a + dt_bias). Padded tokens get beta = 0 and
  g = 0, so the delta rule leaves the state exactly as it was (their value correction is zero,
  whatever their k), and the causal conv skips them (deltanet.causal_conv with the mask).
  """
  b, t, _ = x_BxTxD.shape
  hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
  dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
  m = mask_BxT.astype(x_BxTxD.dtype)
  x = x_BxTxD * m[..., None]
  qkv = dense(x, p["in_proj_qkv"])
  z = dense(x, p["in_proj_z"]).reshape(b, t, hv, dv)
  mf = m.astype(jnp.float32)[..., None]
  beta = jax.nn.sigmoid(dense(x, p["in_proj_b"]).astype(jnp.float32)) * mf
  g = -jnp.exp(p["A_log"].astype(jnp.float32)) * jax.nn.softplus(
      dense(x, p["in_proj_a"]).astype(jnp.float32) + p["dt_bias"].astype(jnp.float32)) * mf
  # Everything a frozen position passes on to later ones: its conv input, beta and g ...
  qkv, beta, g = (stop_gradient_where(a, frozen_BxT) for a in (qkv, beta, g))
  k_conv = config.linear_conv_kernel
  tail = layer_cache.conv if layer_cache is not None else jnp.zeros((b, k_conv - 1, qkv.shape[-1]), qkv.dtype)
  qkv, new_tail = deltanet.causal_conv(qkv, p["conv_weight"], jnp.repeat(tail, b // tail.shape[0], axis=0),
                                       mask_BxT)
  qkv = stop_gradient_where(qkv, frozen_BxT)  # ... and its conv output (q, k, v)
  kd = config.linear_key_dim
  q = qkv[..., :kd].reshape(b, t, hk, dk)
  k = qkv[..., kd : 2 * kd].reshape(b, t, hk, dk)
  v = qkv[..., 2 * kd :].reshape(b, t, hv, dv)
  state = layer_cache.state if layer_cache is not None else None
  if state is not None:  # a cache shared by k continuations: its state serves each of them
    state = jnp.repeat(state, b // state.shape[0], axis=0)
  if t == 1:
    o, new_state = deltanet.recurrent_delta_rule(q, k, v, g, beta, state)
  else:
    o, new_state = deltanet.chunked_delta_rule(q, k, v, g, beta, state, config.chunk_size)
  # Gated RMSNorm per head: w · norm(o) · silu(z) (w is a plain scale, not zero-centred).
  o = rms_norm(o, p["norm"], config.rms_norm_eps, zero_centered=False)
  o = (o.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
  out = dense(o.reshape(b, t, hv * dv), p["out_proj"])
  new_cache = DeltaNetCache(new_state, new_tail.astype(tail.dtype)) if layer_cache is not None else None
  return out, new_cache


class _Inputs(NamedTuple):
  """What every layer of one forward call reads besides its own params and cache."""

  cos: jax.Array
  sin: jax.Array
  mask_BxT: jax.Array  # bool
  slots: Slots
  frozen_BxT: Optional[jax.Array]  # stop_gradient positions
  dropout_rate: float
  dropout_key: Optional[jax.Array]


def _layer(p, x, layer_cache, inp: _Inputs, *, kind: str, index, config: ModelConfig):
  """Returns (x, new layer cache, MLP input) of decoder layer `index` (traced inside the scan)."""
  zc, eps = config.norm_zero_centered, config.rms_norm_eps
  keys = (jax.random.split(jax.random.fold_in(inp.dropout_key, index)) if inp.dropout_key is not None
          else (None, None))
  h = rms_norm(x, p["input_norm"], eps, zc)
  if kind == FULL:
    out, new_cache = attention(p["attn"], h, inp.cos, inp.sin, inp.slots, layer_cache, config, inp.mask_BxT,
                               inp.frozen_BxT)
  else:
    out, new_cache = gated_deltanet(p["linear_attn"], h, inp.mask_BxT, layer_cache, config, inp.frozen_BxT)
  x = x + dropout(out, inp.dropout_rate, keys[0])
  mlp_in = rms_norm(x, p["post_attention_norm"], eps, zc)
  x = x + dropout(mlp(p["mlp"], mlp_in), inp.dropout_rate, keys[1])
  if inp.slots.read_only:
    new_cache = None
  return batch_sharded(stop_gradient_where(x, inp.frozen_BxT)), new_cache, mlp_in


def _remat_policy(remat: Union[bool, str]):
  name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat must be a bool or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  return name, REMAT_POLICIES[name]


def _run_layers(params, x, cache: Optional[Cache], inp: _Inputs, config: ModelConfig, remat, want_hidden: bool,
                want_mlp_inputs: bool):
  """Returns (x, {kind: new stacked layer cache} or None, hidden (L, …) or None, mlp inputs (L, …) or None).

  The layers run as `num_blocks` repeats of `block_pattern`: a lax.scan whose body is one block
  (config.scan_layers), or the same body in a Python loop.
  """
  pattern, n_blocks = config.block_pattern, config.num_blocks
  per_block = {kind: pattern.count(kind) for kind in config.layer_kinds}
  # (L_kind, ...) -> (num_blocks, per block, ...): block r holds layers r·P … r·P + P − 1.
  to_blocks = lambda tree, kind: jax.tree.map(lambda a: a.reshape(n_blocks, per_block[kind], *a.shape[1:]), tree)
  xs_params = {kind: to_blocks(params[layout.LAYERS][kind], kind) for kind in per_block}
  xs_cache = {kind: to_blocks(cache.layers[kind], kind) for kind in per_block} if cache is not None else None

  def block(x, xs):
    r, p_blk, c_blk = xs
    new_caches = {kind: [] for kind in per_block}
    hidden, mlp_inputs, seen = [], [], dict.fromkeys(per_block, 0)
    for j, kind in enumerate(pattern):
      idx = seen[kind]
      seen[kind] += 1
      p = jax.tree.map(lambda a: a[idx], p_blk[kind])
      lc = jax.tree.map(lambda a: a[idx], c_blk[kind]) if c_blk is not None else None
      hidden.append(x)
      x, lc, u = _layer(p, x, lc, inp, kind=kind, index=r * len(pattern) + j, config=config)
      new_caches[kind].append(lc)
      mlp_inputs.append(u)
    stacked = ({kind: jax.tree.map(lambda *a: jnp.stack(a), *cs) for kind, cs in new_caches.items()}
               if c_blk is not None else None)
    return x, (stacked, jnp.stack(hidden) if want_hidden else None, jnp.stack(mlp_inputs) if want_mlp_inputs else None)

  name, policy = _remat_policy(remat)
  if name != "none":
    block = jax.checkpoint(block, policy=policy, prevent_cse=not config.scan_layers)
  if config.scan_layers:
    x, ys = jax.lax.scan(block, x, (jnp.arange(n_blocks), xs_params, xs_cache))
  else:
    outs = []
    for r in range(n_blocks):
      x, y = block(x, jax.tree.map(lambda a: a[r], (jnp.arange(n_blocks), xs_params, xs_cache)))
      outs.append(y)
    ys = jax.tree.map(lambda *a: jnp.stack(a), *outs)
  new_caches, hidden, mlp_inputs = ys
  flat = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])  # (blocks, per block, ...) -> (L, ...)
  if new_caches is not None:
    new_caches = jax.tree.map(flat, new_caches)
  return x, new_caches, None if hidden is None else flat(hidden), None if mlp_inputs is None else flat(mlp_inputs)


def lm_head(params: Params, config: ModelConfig) -> jax.Array:
  """Returns the (D, V) LM head matrix (the embedding's transpose when tied)."""
  return params["embed"].T if config.tie_embeddings else params["lm_head"]


def forward(
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    mask_BxT: jax.Array,
    cache: Optional[Cache] = None,
    *,
    config: ModelConfig,
    head: bool = True,
    write_cache: bool = True,
    remat: Union[bool, str] = False,
    return_hidden: bool = False,
    return_mlp_inputs: bool = False,
    stop_gradient_BxT: Optional[jax.Array] = None,
    dropout_rate: float = 0.0,
    dropout_key: Optional[jax.Array] = None,
) -> Output:
  """Returns an `Output`: logits (or, with head=False, only what the head would read) and the cache.

  Args:
    tokens_BxT, positions_BxT: token ids and their RoPE positions (explicit, so left padding works).
    mask_BxT: 1 for real tokens, 0 for padding. Pads may sit anywhere in a row (left-padded
      contexts, right-padded responses): no real token attends to them, and they change neither
      the DeltaNet recurrent state nor its conv window, so real tokens get the logits they would
      get without the pads. Logits at pads are finite but meaningless.
    cache: None (whole sequence; Output.cache is None) or a Cache to continue from: the T tokens
      are written at slots [cache.end, cache.end + T). That must fit in its capacity: T alone is
      checked here, but `end` is traced, and XLA clamps an out-of-range write (it would silently
      overwrite the last slots), so size the cache for the whole continuation.
    write_cache: False reads the cache as a context and does not continue it (Output.cache is
      None; its capacity need not hold the new tokens). The token rows may then be k times the
      cache's rows: rows b·k … b·k+k−1 each follow cache row b, as with `broadcast_cache(cache, k)`
      but without copying its K/V (context-frozen training scores chosen and rejected so).
    head: apply the LM head (False: logits None; callers that score a few positions apply
      `lm_head` to `head_input` there, e.g. `objectives.linear_sequence_logprobs`).
    remat: rematerialise each scanned block in the backward pass: False / 'none', True / 'full'
      (keep only block inputs), 'dots' (keep projection outputs) — see REMAT_POLICIES.
    return_hidden: also return the residual stream entering each layer and the final one,
      (L + 1, B, T, D) (for per-layer health monitors).
    return_mlp_inputs: also return each layer's MLP input (the normed residual after attention),
      (L, B, T, D); x·W_gate of it is the gate pre-activation (dead-unit counts).
    stop_gradient_BxT: optional bool mask of positions whose activations carry no gradient, at
      every layer: their residual stream, attention keys/values, DeltaNet conv inputs, beta and g.
      A full-sequence pass with the context (all but its last token) masked has exactly the
      gradient of the train step's frozen mode: the reference that mode is tested against.
    dropout_rate, dropout_key: training-time residual dropout (GPT-2's resid_pdrop): every
      attention / DeltaNet and MLP output is dropped (`dropout`) before it joins the residual
      stream, with a key per layer (fold_in(dropout_key, layer)) and branch. 0 or no key: off.
  """
  t = tokens_BxT.shape[1]
  mask = mask_BxT.astype(bool)
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  x = batch_sharded(stop_gradient_where(jnp.take(params["embed"], tokens_BxT, axis=0), stop_gradient_BxT))
  cos, sin = rope_tables(positions_BxT, config)
  rows = tokens_BxT.shape[0]
  if cache is not None and not write_cache:
    if rows % cache.batch_size:
      raise ValueError(f"forward: {rows} token rows are not a multiple of the cache's {cache.batch_size} rows")
    slots = Slots(cache.valid_BxS, cache.end, rows // cache.batch_size, read_only=True)
  elif cache is not None:
    if rows != cache.batch_size:
      raise ValueError(f"forward: {rows} token rows continue a cache of {cache.batch_size} rows; pass "
                       "write_cache=False to read it as a shared context, or broadcast_cache it")
    if t > cache.capacity:
      raise ValueError(f"forward: {t} new tokens do not fit a cache of capacity {cache.capacity}")
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, mask, cache.end, axis=1)
    slots = Slots(valid, cache.end)
  else:
    slots = Slots(mask, jnp.zeros((), jnp.int32))
  dropping = bool(dropout_rate) and dropout_key is not None
  inp = _Inputs(cos, sin, mask, slots, stop_gradient_BxT, float(dropout_rate) if dropping else 0.0,
                dropout_key if dropping else None)
  x, new_layers, hidden, mlp_inputs = _run_layers(params, x, cache, inp, config, remat, return_hidden,
                                                  return_mlp_inputs)
  if hidden is not None:
    hidden = jnp.concatenate([hidden, x[None]], axis=0)
  x = rms_norm(x, params["final_norm"], config.rms_norm_eps, config.norm_zero_centered)
  logits = x @ lm_head(params, config) if head else None
  new_cache = Cache(new_layers, slots.key_valid_BxS, cache.end + t) if cache is not None and write_cache else None
  return Output(logits, new_cache, x, hidden, mlp_inputs)


def prefill(params, tokens_BxT, positions_BxT, mask_BxT, *, config: ModelConfig, capacity: int, dtype=None) -> Cache:
  """Returns the cache of the tokens run from an empty cache, with room for `capacity` tokens.

  The tokens go in `config.prefill_chunk` at a time (a lax.scan continuing the cache: K/V slots
  and DeltaNet state carry over), so memory grows linearly with the context, and no LM head is
  applied. A T that is not a multiple of the chunk is left-padded (pads are invisible: mask 0);
  the cache then has those extra slots in front, `capacity` + pad in all.
  """
  b, t = tokens_BxT.shape
  if t > capacity:
    raise ValueError(f"prefill: {t} tokens do not fit a cache of capacity {capacity}")
  chunk = config.prefill_chunk
  pad = (-t) % chunk if chunk and t > chunk else 0
  cache = init_cache(config, b, capacity + pad, dtype or params["embed"].dtype)
  if t == 0:
    return cache
  if not pad and (not chunk or t <= chunk):
    return forward(params, tokens_BxT, positions_BxT, mask_BxT, cache, config=config, head=False).cache
  left = lambda x: jnp.pad(x, [(0, 0), (pad, 0)])
  n = (t + pad) // chunk
  chunks = [jnp.moveaxis(left(x).reshape(b, n, chunk), 1, 0) for x in (tokens_BxT, positions_BxT, mask_BxT)]

  def one(cache, xs):
    tok, pos, m = xs
    return forward(params, tok, pos, m, cache, config=config, head=False).cache, None

  cache, _ = jax.lax.scan(one, cache, tuple(chunks))
  return cache


def positions_from_mask(mask_BxT: jax.Array, offset_B: Optional[jax.Array] = None) -> jax.Array:
  """Returns RoPE positions that count only real tokens (0 for left pads), plus an offset per row."""
  pos = jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)
  return pos if offset_B is None else pos + offset_B[:, None]


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Returns randomly initialised params (normal(0, std) matrices; norms at identity).

  Jitted, with one random draw per kind of tensor (not one per tensor), so it compiles in well
  under a second for tiny configs and can be vmapped over keys. The draws are laid out layer by
  layer and then stacked, so a seed gives the same weights whatever the stacking.
  """
  return _init_params(config, key, jnp.dtype(dtype), float(std))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_params(config: ModelConfig, key: jax.Array, dtype, std: float) -> Params:
  d, f, hv = config.hidden_size, config.intermediate_size, config.linear_num_value_heads
  h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
  norm = lambda n: jnp.zeros((n,), dtype) if config.norm_zero_centered else jnp.ones((n,), dtype)
  layers = []
  for kind in config.layer_types:
    layer = {"input_norm": norm(d), "post_attention_norm": norm(d),
             "mlp": {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}}
    if kind == FULL:
      layer["attn"] = {"q_proj": (d, h * hd * (2 if config.attn_output_gate else 1)), "k_proj": (d, kv * hd),
                       "v_proj": (d, kv * hd), "o_proj": (h * hd, d), "q_norm": norm(hd), "k_norm": norm(hd)}
    else:
      layer["linear_attn"] = {
          "in_proj_qkv": (d, config.linear_conv_dim), "in_proj_z": (d, config.linear_value_dim),
          "in_proj_b": (d, hv), "in_proj_a": (d, hv), "out_proj": (config.linear_value_dim, d),
          "conv_weight": None, "A_log": None,  # filled below
          "dt_bias": jnp.ones((hv,), dtype), "norm": jnp.ones((config.linear_value_head_dim,), dtype)}
    layers.append(layer)
  params = {"embed": (config.vocab_size, d), "layers": layers, "final_norm": norm(d)}
  if not config.tie_embeddings:
    params["lm_head"] = (d, config.vocab_size)

  # Every matrix (a shape tuple above) is a slice of one normal draw.
  is_shape = lambda x: isinstance(x, tuple)
  shapes, treedef = jax.tree.flatten(params, is_leaf=lambda x: is_shape(x) or x is None)
  sizes = [math.prod(s) if is_shape(s) else 0 for s in shapes]
  k_mat, k_conv, k_a = jax.random.split(key, 3)
  flat = jax.random.normal(k_mat, (sum(sizes),), jnp.float32) * std
  offsets = np.cumsum([0] + sizes)
  leaves = [(flat[o : o + n].reshape(s)).astype(dtype) if is_shape(s) else s
            for s, o, n in zip(shapes, offsets, sizes)]
  params = jax.tree.unflatten(treedef, leaves)
  n_lin = config.layer_types.count(LINEAR)
  if n_lin:
    conv = jax.random.normal(k_conv, (n_lin, config.linear_conv_kernel, config.linear_conv_dim)) / math.sqrt(
        config.linear_conv_kernel)
    a_log = jnp.log(jax.random.uniform(k_a, (n_lin, hv), jnp.float32, 0.01, 16.0))
    lin = [p["linear_attn"] for p in params["layers"] if "linear_attn" in p]
    for i, p in enumerate(lin):
      p["conv_weight"], p["A_log"] = conv[i].astype(dtype), a_log[i].astype(dtype)
  params["layers"] = layout.stack(params["layers"], config)
  return params
