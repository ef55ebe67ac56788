"""Causal grouped-query attention over cache slots, in O(T·block) memory (forward and backward).

One function, `dot_product_attention`, serves every caller of the decoder: a whole sequence
(training, scoring), a chunk of a prefill continuing a cache, a response continuing a frozen
context, one decoding step. Its mask is the decoder's slot rule:

    query t sits at slot q_start + t;  key s at slot s;
    t attends s  ⇔  key_valid[b, s]  and  s <= q_start + t

Left padding, right padding and cache continuation are all expressed by `key_valid` and
`q_start` (RoPE positions are applied to q and k before the call, so they never enter here).
A query that sees no key (a left pad) gets output 0 and passes no gradient.

Implementations (`ModelConfig.attention_impl`):

* 'blockwise' — pure JAX, every platform. FlashAttention-2's algorithm (Dao 2023, arXiv
  2307.08691; the online softmax of Milakov & Gimelshein 2018): queries and keys in blocks
  (`block`, `ModelConfig.attention_block`), a running max m and normaliser l per query,

      m' = max(m, max_s S_qs),   l' = e^{m−m'} l + Σ_s e^{S_qs−m'},   O' = e^{m−m'} O + Σ_s e^{S_qs−m'} V_s

  and O / l at the end. Key blocks wholly after a query block's last slot are never visited (a
  while loop, so causal attention does half the work), and the mask of a block is built from
  slots and `key_valid` inside the loop, never as a T×S array. The backward pass is a custom VJP
  that stores only O and the log-sum-exp L = m + log l per query and recomputes each block's
  probabilities P = exp(S − L):

      dV_s += Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP − rowsum(dO ⊙ O)),   dQ += dS K·τ,   dK += dSᵀ Q·τ

  with S = Q Kᵀ·τ, τ = H^−1/2.
  GQA: the G = N / K query heads of a kv head are a group axis of the query; K and V are never
  repeated. Scores, m, l and the accumulators are float32 whatever the input dtype.
  When a call fits one block (T, S <= block) the same masked softmax runs as
  plain JAX ops (no loops, no custom VJP): short sequences compile to a few fused ops.

* 'auto' — 'blockwise' (chosen per platform; the only implementation today: cuDNN's fused
  attention cannot express left padding with a query offset without a dense T×S bias, see
  README).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dreamjax.model.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

_NEG = -1e30  # finite "−∞" for masked scores: e^{_NEG − m} underflows to exactly 0
_M0 = -1e20  # the running max starts here, above _NEG: a row with no visible key yet gets p = e^{_NEG − _M0} = 0
_NO_KEY_LSE = 1e30  # log-sum-exp of a query with no visible key: exp(S − L) = 0 in the backward


def resolve(impl: str) -> str:
  """Returns the implementation that `impl` runs as on this platform ('auto' resolved)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  return "blockwise" if impl == "auto" else impl


def default_block() -> int:
  """Returns the block size for this platform: 256 on CPU (fastest of 64–1024 at T = 4096, 2 cores),
  512 on accelerators (more work per loop iteration)."""
  return 256 if jax.default_backend() == "cpu" else 512


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          key_valid_BxS: jax.Array, q_start: jax.Array | int = 0, *, impl: str = "auto",
                          block: int = 0, return_lse: bool = False):
  """Returns softmax(q kᵀ / sqrt(H), masked by the slot rule) v, shape (B, T, N, H) in q's dtype.

  With return_lse: (out, lse_BxTxN), lse = log Σ_visible exp(q·k / sqrt(H)) in float32 (−1e30 for a
  query that sees no key), differentiable: two attentions over disjoint key sets combine exactly
  as (e^{lse₁} out₁ + e^{lse₂} out₂) / (e^{lse₁} + e^{lse₂}) (`merge`).

  Args:
    q_BxTxNxH: queries (N = G·K heads, grouped: head n uses kv head n // G).
    k_BxSxKxH, v_BxSxKxH: keys and values of S slots.
    key_valid_BxS: bool, slot s of row b holds a real token.
    q_start: int32 scalar, the slot of query 0 (traced: a cache's write index).
    impl: see the module docstring.
    block: query and key block of the blockwise path (static); 0: `default_block()`.
  """
  resolve(impl)
  block = block or default_block()
  b, t, n, h = q_BxTxNxH.shape
  s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if n % kv:
    raise ValueError(f"attention: {n} query heads are not a multiple of {kv} kv heads")
  q = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
  q_start = jnp.asarray(q_start, jnp.int32)
  valid = key_valid_BxS.astype(bool)
  if t == 0 or s == 0:  # nothing to attend to (or nobody asking): out 0, lse −∞
    out, lse = jnp.zeros_like(q), jnp.full((b, kv, n // kv, t), _NEG, jnp.float32)
  elif t <= block and s <= block:
    out, lse = _one_block(q, k_BxSxKxH, v_BxSxKxH, valid, q_start)
  else:
    out, lse = _blockwise(q, k_BxSxKxH, v_BxSxKxH, valid, q_start, min(block, t), min(block, s))
  out = out.reshape(b, t, n, h)
  if not return_lse:
    return out
  return out, jnp.moveaxis(lse, 3, 1).reshape(b, t, n)  # (B, K, G, T) -> (B, T, N)


def merge(out1_BxTxNxH, lse1_BxTxN, out2_BxTxNxH, lse2_BxTxN):
  """Returns the attention over the union of two disjoint key sets from each set's (out, lse)."""
  m = jax.lax.stop_gradient(jnp.maximum(lse1_BxTxN, lse2_BxTxN))
  w1, w2 = jnp.exp(lse1_BxTxN - m), jnp.exp(lse2_BxTxN - m)
  total = w1 + w2
  out = (w1[..., None] * out1_BxTxNxH.astype(jnp.float32) + w2[..., None] * out2_BxTxNxH.astype(jnp.float32))
  return (out / jnp.where(total > 0, total, 1.0)[..., None]).astype(out1_BxTxNxH.dtype)


# ---------------------------------------------------------------------------------------------
# One block: plain JAX (autodiff), for calls that fit a single block.


def _allowed(valid_BxS, q_slot_T, k_slot_S):
  """Returns the (B, 1, 1, T, S) mask of the slot rule for one block."""
  causal = k_slot_S[None, :] <= q_slot_T[:, None]
  return valid_BxS[:, None, None, None, :] & causal[None, None, None]


def _scores(q_BxTxKxGxH, k_BxSxKxH):
  """Returns float32 scores (B, K, G, T, S) scaled by H^−1/2."""
  s = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH.astype(q_BxTxKxGxH.dtype),
                 preferred_element_type=jnp.float32)
  return s * (q_BxTxKxGxH.shape[-1] ** -0.5)


def _one_block(q, k, v, valid, q_start):
  t, s = q.shape[1], k.shape[1]
  allowed = _allowed(valid, q_start + jnp.arange(t), jnp.arange(s))
  sc = jnp.where(allowed, _scores(q, k), _NEG)
  m = jax.lax.stop_gradient(jnp.max(sc, axis=-1, keepdims=True))
  p = jnp.where(allowed, jnp.exp(sc - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  w = p / jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("bkgts,bskh->btkgh", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG)[..., 0]  # (B, K, G, T)
  return out.astype(q.dtype), lse


# ---------------------------------------------------------------------------------------------
# Blockwise: online softmax forward, recomputing backward (custom VJP).


def _pad_to(x, axis, size):
  extra = size - x.shape[axis]
  if not extra:
    return x
  return jnp.pad(x, [(0, 0)] * axis + [(0, extra)] + [(0, 0)] * (x.ndim - axis - 1))


def _blocks(x, axis, block):
  """Returns x split along `axis` into (num_blocks, …, block, …) with the block index leading."""
  n = -(-x.shape[axis] // block)
  x = _pad_to(x, axis, n * block)
  x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis, length):
  """Inverse of `_blocks` (x: (num_blocks, …, block, …)), cut to `length` along `axis`."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _key_blocks_to_visit(q_start, i, block_q, block_k, t, num_kb):
  """Returns how many key blocks query block i sees: up to the block of its last query's slot."""
  last_slot = q_start + jnp.minimum((i + 1) * block_q, t) - 1
  return jnp.clip(last_slot // block_k + 1, 0, num_kb)


def _heads_major(x_BxTxKxGxH, block):
  """Returns queries (or their cotangents) as (NQ, B, K, G·block, H): row g·block + t is query t of group g."""
  b, _, kv, g, h = x_BxTxKxGxH.shape
  x = _blocks(x_BxTxKxGxH, 1, block)  # (NQ, B, bq, K, G, H)
  return jnp.transpose(x, (0, 1, 3, 4, 2, 5)).reshape(x.shape[0], b, kv, g * block, h)


def _from_heads_major(x, t, g):
  """Inverse of `_heads_major`: (NQ, B, K, G·bq, H) -> (B, T, K, G, H)."""
  n, b, kv, gq, h = x.shape
  x = jnp.transpose(x.reshape(n, b, kv, g, gq // g, h), (1, 0, 4, 2, 3, 5))  # (B, NQ, bq, K, G, H)
  return x.reshape(b, n * (gq // g), kv, g, h)[:, :t]


def _row_slots(q_start, i, block_q, g):
  """Returns the slot of each row of query block i in the heads-major layout, (G·bq,)."""
  return q_start + i * block_q + jnp.tile(jnp.arange(block_q), g)


def _kv_blocks(x_BxSxKxH, block):
  """Returns keys or values as (NK, B, K, bk, H) (padding slots are zeros)."""
  return jnp.transpose(_blocks(x_BxSxKxH, 1, block), (0, 1, 3, 2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise(q, k, v, valid, q_start, block_q, block_k):
  return _blockwise_fwd(q, k, v, valid, q_start, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, valid, q_start, block_q, block_k):
  """Online-softmax forward; returns ((o, lse), residuals). Scores are (B, K, G·bq, bk) per block."""
  b, t, kv, g, h = q.shape
  q_blk = _heads_major(q * jnp.asarray(h ** -0.5, q.dtype), block_q)  # the scale folded into q once
  k_blk, v_blk = _kv_blocks(k, block_k), _kv_blocks(v, block_k)
  valid_blk = _blocks(valid, 1, block_k)  # (NK, B, bk), padding slots invalid
  num_kb = k_blk.shape[0]
  rows = g * block_q

  def query_block(args):
    i, q_i = args  # (B, K, G·bq, H)
    q_slot = _row_slots(q_start, i, block_q, g)

    def key_block(j, carry):
      m, l, acc = carry
      allowed = valid_blk[j][:, None, None, :] & ((j * block_k + jnp.arange(block_k))[None, :] <= q_slot[:, None])
      sc = jnp.einsum("bkrh,bksh->bkrs", q_i, k_blk[j].astype(q_i.dtype), preferred_element_type=jnp.float32)
      sc = jnp.where(allowed, sc, _NEG)  # masked: e^{_NEG − m} = 0, as m >= _M0 > _NEG
      m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
      p = jnp.exp(sc - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bkrs,bksh->bkrh", p.astype(v_blk.dtype), v_blk[j], preferred_element_type=jnp.float32)
      return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

    init = (jnp.full((b, kv, rows), _M0, jnp.float32), jnp.zeros((b, kv, rows), jnp.float32),
            jnp.zeros((b, kv, rows, h), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _key_blocks_to_visit(q_start, i, block_q, block_k, t, num_kb), key_block, init)
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _NO_KEY_LSE)
    return o.astype(q.dtype), lse  # (B, K, G·bq, H), (B, K, G·bq)

  o_blk, lse_blk = jax.lax.map(query_block, (jnp.arange(q_blk.shape[0]), q_blk))
  o = _from_heads_major(o_blk, t, g)
  lse = _from_heads_major(lse_blk[..., None], t, g)[..., 0]  # (B, T, K, G)
  lse = jnp.moveaxis(jnp.where(lse == _NO_KEY_LSE, _NEG, lse), 1, 3)  # the public convention, (B, K, G, T)
  return (o, lse), (q, k, v, valid, q_start, o, lse_blk)


def _blockwise_fwd_rule(q, k, v, valid, q_start, block_q, block_k):
  """The custom VJP's forward (symbolic zeros): records whether K and V need a gradient at all.

  A frozen context's K/V enter under stop_gradient; their gradient is then not computed (two of
  the backward's five matmuls per block).
  """
  kv_grad = k.perturbed or v.perturbed
  out, res = _blockwise_fwd(q.value, k.value, v.value, valid.value, q_start.value, block_q, block_k)
  return out, res + (jnp.zeros((0,)) if kv_grad else None,)


def _blockwise_bwd(block_q, block_k, res, cotangents):
  q, k, v, valid, q_start, o, lse_blk, kv_grad = res
  kv_grad = kv_grad is not None
  do, dlse = (jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.custom_derivatives.SymbolicZero) else x
              for x in cotangents)  # dlse (B, K, G, T): d lse / d S = P, so dS gains P ⊙ dlse
  b, t, kv, g, h = q.shape
  s = k.shape[1]
  scale = h ** -0.5
  q_blk = _heads_major(q * jnp.asarray(scale, q.dtype), block_q)  # S = (τ q) kᵀ: dK = dSᵀ (τ q)
  do_blk = _heads_major(do, block_q)
  k_blk, v_blk = _kv_blocks(k, block_k), _kv_blocks(v, block_k)
  valid_blk = _blocks(valid, 1, block_k)
  num_kb = k_blk.shape[0]
  # rowsum(dO ⊙ O) − dlse per query, heads-major (NQ, B, K, G·bq)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1) - jnp.moveaxis(dlse, 3, 1)
  delta_blk = _heads_major(delta[..., None], block_q)[..., 0]

  def query_block(dkv, xs):
    i, q_i, do_i, lse_i, delta_i = xs
    q_slot = _row_slots(q_start, i, block_q, g)

    def key_block(j, carry):
      dq_i, dk, dv = carry
      k_j, v_j = k_blk[j], v_blk[j]
      allowed = valid_blk[j][:, None, None, :] & ((j * block_k + jnp.arange(block_k))[None, :] <= q_slot[:, None])
      sc = jnp.einsum("bkrh,bksh->bkrs", q_i, k_j.astype(q_i.dtype), preferred_element_type=jnp.float32)
      p = jnp.exp(jnp.where(allowed, sc, _NEG) - lse_i[..., None])  # (B, K, G·bq, bk); 0 where masked
      dp = jnp.einsum("bkrh,bksh->bkrs", do_i, v_j.astype(do_i.dtype), preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])
      dq_i = dq_i + jnp.einsum("bkrs,bksh->bkrh", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
      if not kv_grad:
        return dq_i, dk, dv
      dv_j = jnp.einsum("bkrs,bkrh->bksh", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bkrs,bkrh->bksh", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
      return dq_i, dk.at[j].add(dk_j), dv.at[j].add(dv_j)

    dk, dv = dkv
    init = (jnp.zeros(q_i.shape, jnp.float32), dk, dv)
    dq_i, dk, dv = jax.lax.fori_loop(0, _key_blocks_to_visit(q_start, i, block_q, block_k, t, num_kb), key_block,
                                     init)
    return (dk, dv), dq_i * scale

  zeros = jnp.zeros(k_blk.shape if kv_grad else (0,), jnp.float32)
  (dk_blk, dv_blk), dq_blk = jax.lax.scan(
      query_block, (zeros, zeros), (jnp.arange(q_blk.shape[0]), q_blk, do_blk, lse_blk, delta_blk))
  dq = _from_heads_major(dq_blk, t, g).astype(q.dtype)
  if not kv_grad:
    return dq, None, None, None, None
  unkv = lambda x: _unblocks(jnp.transpose(x, (0, 1, 3, 2, 4)), 1, s)  # (NK, B, K, bk, H) -> (B, S, K, H)
  return dq, unkv(dk_blk).astype(k.dtype), unkv(dv_blk).astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd_rule, _blockwise_bwd, symbolic_zeros=True)
