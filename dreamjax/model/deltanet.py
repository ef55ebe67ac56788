"""The gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks", arXiv 2412.06464).

Per value head, with state S (dk×dv), L2-normalised q_t, k_t (q scaled by dk^-1/2), gate g_t <= 0
and step size beta_t in (0, 1):

    S_t = exp(g_t) S_{t-1} + k_t ⊗ beta_t (v_t − exp(g_t) S_{t-1}ᵀ k_t)
    o_t = S_tᵀ q_t

`recurrent_delta_rule` scans tokens one by one (decoding); `chunked_delta_rule` is the parallel
WY form over chunks of C tokens (training, prefill): inside a chunk the interactions are a
unit-lower-triangular solve, across chunks the state is carried by a scan. Both accept an initial
state and return the final one, so a cache can continue either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Returns x / sqrt(Σx² + eps) over the last axis (the FLA / transformers convention)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _prepare(q, k, v, g, beta):
  """Returns float32 head-major tensors: q,k (B,H,T,dk) with q/k L2-normalised and q scaled."""
  hv = v.shape[2]
  if q.shape[2] != hv:  # grouped value heads: each q/k head serves hv // hk consecutive v heads
    q = jnp.repeat(q, hv // q.shape[2], axis=2)
    k = jnp.repeat(k, hv // k.shape[2], axis=2)
  f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 1, 2)
  q, k, v, g, beta = f32(q), f32(k), f32(v), jnp.swapaxes(g.astype(jnp.float32), 1, 2), jnp.swapaxes(
      beta.astype(jnp.float32), 1, 2)
  q = l2norm(q) * (q.shape[-1] ** -0.5)
  k = l2norm(k)
  return q, k, v, g, beta


@jax.custom_vjp
def unit_lower_inverse(n_strict: jax.Array) -> jax.Array:
  """Returns (I + N)⁻¹ for strictly lower-triangular N (..., C, C), by forward substitution.

  Row i of X = (I + N)⁻¹ is e_i − Σ_{j<i} N_ij X_j: C−1 steps of batched vector-matrix products
  (what transformers' torch kernel does too). Plain XLA ops, not `solve_triangular`: jaxlib's CPU
  trsm custom call was seen to deadlock in its thread pool on batched small matrices. The
  gradient, −strict_lower(Xᵀ X̄ Xᵀ), is two matmuls instead of a backward pass over the loop.
  """
  c = n_strict.shape[-1]
  eye = jnp.eye(c, dtype=n_strict.dtype)

  def row(i, x):  # rows j < i of x are final and n[i, j >= i] = 0, so n[i] @ x sums over j < i only
    return x.at[..., i, :].set(eye[i] - jnp.einsum("...j,...jk->...k", n_strict[..., i, :], x))

  return jax.lax.fori_loop(1, c, row, jnp.broadcast_to(eye, n_strict.shape))


def _unit_lower_inverse_fwd(n_strict):
  x = unit_lower_inverse(n_strict)
  return x, x


def _unit_lower_inverse_bwd(x, x_bar):
  xt = jnp.swapaxes(x, -1, -2)
  return (jnp.tril(-(xt @ x_bar @ xt), -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def recurrent_delta_rule(q_BxTxHkxK, k_BxTxHkxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, state_BxHxKxV=None):
  """Returns (o_BxTxHxV, final state_BxHxKxV float32), one token at a time (lax.scan)."""
  q, k, v, g, beta = _prepare(q_BxTxHkxK, k_BxTxHkxK, v_BxTxHxV, g_BxTxH, beta_BxTxH)
  b, h, _, dk = k.shape
  dv = v.shape[-1]
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if state_BxHxKxV is None else state_BxHxKxV.astype(jnp.float32)

  def step(s, xs):
    q_t, k_t, v_t, g_t, b_t = xs  # (B,H,dk), (B,H,dk), (B,H,dv), (B,H), (B,H)
    s = s * jnp.exp(g_t)[..., None, None]
    kv_mem = jnp.einsum("bhkv,bhk->bhv", s, k_t)
    delta = (v_t - kv_mem) * b_t[..., None]
    s = s + k_t[..., :, None] * delta[..., None, :]
    return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, g, beta))
  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1).astype(v_BxTxHxV.dtype), s  # o: (T,B,H,dv) -> (B,T,H,dv)


def chunked_delta_rule(q_BxTxHkxK, k_BxTxHkxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, state_BxHxKxV=None, chunk_size=64):
  """Returns (o_BxTxHxV, final state_BxHxKxV float32), chunk-parallel (WY representation).

  Within a chunk with cumulative log-decay γ_i = Σ_{j<=i} g_j:
    A   = I + strict_lower((β k) kᵀ ⊙ exp(γ_i − γ_j))          (unit lower triangular, inverted
                                                               by forward substitution)
    U   = A⁻¹ (β v),   W = A⁻¹ (β k ⊙ exp(γ))
    v'  = U − W S                      (the chunk's corrected values given the entry state S)
    o   = (q ⊙ exp(γ)) S + (q kᵀ ⊙ exp(γ_i − γ_j) ⊙ lower) v'
    S'  = exp(γ_C) S + (k ⊙ exp(γ_C − γ))ᵀ v'
  Padded tail tokens (to a multiple of the chunk) have k = v = 0 and g = 0, so they change nothing.
  """
  q, k, v, g, beta = _prepare(q_BxTxHkxK, k_BxTxHkxK, v_BxTxHxV, g_BxTxH, beta_BxTxH)
  b, h, t, dk = k.shape
  dv = v.shape[-1]
  c = min(chunk_size, t)
  pad = (-t) % c
  if pad:
    padt = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    q, k, v, g, beta = map(padt, (q, k, v, g, beta))
  n = (t + pad) // c
  chunk = lambda x: x.reshape(b, h, n, c, *x.shape[3:])
  q, k, v, g, beta = map(chunk, (q, k, v, g, beta))
  v_beta = v * beta[..., None]
  k_beta = k * beta[..., None]
  gam = jnp.cumsum(g, axis=-1)  # (B,H,N,C)
  lower = jnp.tril(jnp.ones((c, c), bool))
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  # γ_i − γ_j = Σ_{j<l<=i} g_l summed directly ("segment sums"), not as a difference of two large
  # cumulative sums: with strong decay (γ ~ −300 within a chunk) the difference would lose ~1e-5
  # of relative precision in float32.
  seg = jnp.cumsum(jnp.where(strict, g[..., :, None], 0.0), axis=-2)  # [i, j] = Σ_{j<l<=i} g_l
  decay = jnp.where(lower, jnp.exp(seg), 0.0)  # exp(γ_i − γ_j), i >= j
  a_inv = unit_lower_inverse(jnp.where(strict, jnp.einsum("bhnik,bhnjk->bhnij", k_beta, k) * decay, 0.0))
  u = a_inv @ v_beta
  w = a_inv @ (k_beta * jnp.exp(gam)[..., None])
  attn = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * decay
  q_dec = q * jnp.exp(gam)[..., None]
  rest = jnp.concatenate([jnp.flip(jnp.cumsum(jnp.flip(g[..., 1:], -1), axis=-1), -1),
                          jnp.zeros_like(g[..., :1])], axis=-1)  # γ_C − γ_i = Σ_{l>i} g_l, summed directly
  k_dec = k * jnp.exp(rest)[..., None]
  chunk_decay = jnp.exp(gam[..., -1])  # (B,H,N)
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if state_BxHxKxV is None else state_BxHxKxV.astype(jnp.float32)

  def step(s, xs):
    u_i, w_i, attn_i, qd_i, kd_i, cd_i = xs
    v_new = u_i - jnp.einsum("bhck,bhkv->bhcv", w_i, s)
    o_i = jnp.einsum("bhck,bhkv->bhcv", qd_i, s) + jnp.einsum("bhij,bhjv->bhiv", attn_i, v_new)
    s = s * cd_i[..., None, None] + jnp.einsum("bhck,bhcv->bhkv", kd_i, v_new)
    return s, o_i

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u, w, attn, q_dec, k_dec, chunk_decay))
  s, o = jax.lax.scan(step, s0, xs)  # o: (N,B,H,C,dv)
  o = jnp.moveaxis(o, 0, 2).reshape(b, h, n * c, dv)[:, :, :t]
  return jnp.swapaxes(o, 1, 2).astype(v_BxTxHxV.dtype), s


def causal_conv(x_BxTxC: jax.Array, w_KxC: jax.Array, tail_BxKm1xC: jax.Array, mask_BxT=None) -> tuple[jax.Array, jax.Array]:
  """Returns (silu(depthwise causal conv(x)), new tail): out_t = Σ_j w_j · x_{t−K+1+j}.

  `tail` holds the K−1 inputs before x (zeros at the start of a sequence); the new tail is the
  last K−1 inputs of [tail, x], so a continuation sees exactly what one long call would.

  With `mask_BxT` (1 = real token), padding is skipped wherever it sits: the window of a real
  token holds the K−1 previous *real* inputs and the new tail the last K−1 real ones, so padded
  tokens change neither the real outputs nor the conv state (outputs at pads are meaningless).
  This is done by compacting each row's real inputs to the front (a scatter by rank), running the
  conv there and gathering the outputs back.
  """
  kk = w_KxC.shape[0]
  full = jnp.concatenate([tail_BxKm1xC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)  # (B, N = K−1+T, C)
  b, n, _ = full.shape
  t = x_BxTxC.shape[1]
  if mask_BxT is not None:
    valid = jnp.concatenate([jnp.ones((b, kk - 1), bool), mask_BxT.astype(bool)], axis=1)
    rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # slot of each real input once compacted
    # Pads go to a dump slot n, dropped after the scatter. The scatter is per row (vmap: a scatter
    # with a batching dimension), so a batch split over devices stays split.
    compact = lambda x_NxC, slot_N: jnp.zeros((n + 1, x_NxC.shape[1]), x_NxC.dtype).at[slot_N].set(x_NxC)[:n]
    full = jax.vmap(compact)(full, jnp.where(valid, rank, n))
  out = sum(full[:, j : j + t, :] * w_KxC[j] for j in range(kk))
  if mask_BxT is None:
    return jax.nn.silu(out), full[:, t:, :]
  count = rank[:, -1:] + 1  # real inputs per row, the tail included (≥ K−1)
  # A pad takes the output of the real token before it (clipped at the row start): finite filler.
  out = jnp.take_along_axis(out, jnp.maximum(rank[:, kk - 1 :] - (kk - 1), 0)[..., None], axis=1)
  tail = jnp.take_along_axis(full, (count - (kk - 1) + jnp.arange(kk - 1))[..., None], axis=1)
  return jax.nn.silu(out), tail
