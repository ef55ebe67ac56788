"""Blockwise attention vs an independent numpy reference and a dense autodiff path.

The slot rule (dreamjax.model.attention): query t at slot q_start + t sees key s iff key_valid[b, s]
and s <= q_start + t; a query that sees no key outputs 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax.model import attention


def np_attention(q, k, v, valid, q_start):
  """float64 numpy: softmax over the visible keys, GQA by head index n // (N / K); 0 if none visible."""
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for ni in range(n):
      sc = q[bi, :, ni].astype(np.float64) @ k[bi, :, ni // g].astype(np.float64).T / np.sqrt(h)  # (t, s)
      vis = valid[bi][None, :] & (np.arange(s)[None, :] <= q_start + np.arange(t)[:, None])
      sc = np.where(vis, sc, -np.inf)
      m = np.max(sc, axis=1, keepdims=True)
      w = np.where(vis, np.exp(sc - np.where(np.isfinite(m), m, 0.0)), 0.0)
      w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)
      out[bi, :, ni] = w @ v[bi, :, ni // g].astype(np.float64)
  return out


def dense_attention(q, k, v, valid, q_start):
  """The naive T×S path in jnp (a second code path for gradients): scores, mask, softmax."""
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  sc = jnp.einsum("btkgh,bskh->bkgts", qg, k) / np.sqrt(h)
  vis = valid[:, None, None, None, :] & (jnp.arange(s)[None, :] <= q_start + jnp.arange(t)[:, None])
  w = jax.nn.softmax(jnp.where(vis, sc, -1e30), axis=-1) * jnp.any(vis, axis=-1, keepdims=True)
  return jnp.einsum("bkgts,bskh->btkgh", w, v).reshape(b, t, n, h)


# (B, T, S, N, KV, H, q_start, block): GQA 3:1 and 2:1, T and S not multiples of the block, a
# cache continuation (S > T, q_start > 0), one decoding query, and a call that fits one block.
CASES = [(2, 37, 37, 6, 2, 5, 0, 8), (3, 13, 50, 4, 2, 7, 30, 8), (1, 1, 29, 4, 1, 3, 23, 8),
         (2, 23, 23, 6, 3, 5, 0, 64), (2, 41, 53, 4, 4, 3, 12, 16)]


def inputs(b, t, s, n, kv, h, q_start, seed):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, kv, h), (b, s, kv, h)))
  valid = np.ones((b, s), bool)
  valid[0, :5] = False  # left padding
  valid[-1, s - 3:] = False  # right padding (slots not yet written)
  if b > 2:
    valid[1, :] = False  # a row with no key at all
  visible = valid[:, None, :] & (np.arange(s)[None, None, :] <= q_start + np.arange(t)[None, :, None])
  return q, k, v, valid, visible.any(-1)  # (B, T): the query sees some key


@functools.lru_cache(maxsize=None)
def attend(block):
  return jax.jit(functools.partial(attention.dot_product_attention, block=block))


@pytest.mark.parametrize("b,t,s,n,kv,h,q_start,block", CASES)
def test_matches_numpy_and_dense_gradients(b, t, s, n, kv, h, q_start, block):
  q, k, v, valid, seen = inputs(b, t, s, n, kv, h, q_start, seed=t + s)
  got = np.asarray(attend(block)(q, k, v, valid, q_start))
  want = np_attention(q, k, v, valid, q_start)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert np.all(got[~seen] == 0)  # no visible key: output 0
  # Gradients of a weighted sum against autodiff of the dense path, every input.
  w = np.random.default_rng(0).normal(size=got.shape).astype(np.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
  blockwise = jax.jit(jax.grad(loss(lambda q, k, v: attention.dot_product_attention(
      q, k, v, valid, q_start, block=block)), argnums=(0, 1, 2)))(q, k, v)
  dense = jax.grad(loss(lambda q, k, v: dense_attention(q, k, v, valid, q_start)), argnums=(0, 1, 2))(q, k, v)
  for name, a, r in zip("qkv", blockwise, dense):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()), err_msg=f"d{name}")
  assert np.all(np.asarray(blockwise[0])[~seen] == 0)  # a query that sees nothing passes no gradient
  # K and V under stop_gradient (a frozen context): the backward skips their gradient, dQ is unchanged.
  frozen_kv = jax.jit(jax.grad(loss(lambda q, k, v: attention.dot_product_attention(
      q, jax.lax.stop_gradient(k), jax.lax.stop_gradient(v), valid, q_start, block=block)), argnums=(0, 1, 2)))
  dq, dk, dv = frozen_kv(q, k, v)
  np.testing.assert_allclose(dq, dense[0], rtol=1e-5, atol=1e-5 * float(jnp.abs(dense[0]).max()))
  assert not np.any(dk) and not np.any(dv)


def test_bfloat16_inputs_keep_float32_softmax():
  q, k, v, valid, _ = inputs(2, 37, 37, 6, 2, 5, 0, seed=1)
  got = attend(8)(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), valid, 0)
  assert got.dtype == jnp.bfloat16
  want = np_attention(*(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v)), valid, 0)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02)


def test_memory_grows_linearly_not_with_the_score_matrix():
  """Compiled forward + backward temporaries at T = 1024 and 2048 (block 128): linear growth (x2);
  the dense path's T×S scores grow x4."""

  def temp_bytes(fn, t):
    x = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    grad = jax.grad(lambda q, k, v, m: jnp.sum(fn(q, k, v, m)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(x, kv, kv, valid).compile().memory_analysis().temp_size_in_bytes

  block = lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, 0, block=128)
  dense = lambda q, k, v, m: dense_attention(q, k, v, m, 0)
  ratio_block = temp_bytes(block, 2048) / temp_bytes(block, 1024)
  ratio_dense = temp_bytes(dense, 2048) / temp_bytes(dense, 1024)
  assert ratio_block < 2.5 and ratio_dense > 3.5, (ratio_block, ratio_dense)
  assert temp_bytes(block, 2048) < temp_bytes(dense, 2048) / 8


def test_rejects_unknown_implementation():
  q, k, v, valid, _ = inputs(1, 3, 3, 2, 1, 4, 0, seed=0)
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    attention.dot_product_attention(q, k, v, valid, impl="flash")


@pytest.mark.parametrize("block", [8, 64])
def test_lse_merges_two_disjoint_key_sets_exactly(block):
  """Attention over [context | own keys] equals the merge of attention over the context (all
  visible: queries sit after it) and causal attention over the own keys, values and gradients;
  this is how continuations share one context cache (dreamjax.model.decoder)."""
  b, s1, t, n, kv, h = 2, 29, 11, 6, 2, 5
  q, k, v, valid, _ = inputs(b, t, s1 + t, n, kv, h, 0, seed=7)
  valid[:, s1:] = True
  valid[1, s1 + 8:] = False  # a right-padded continuation

  def whole(q, k, v):
    return attention.dot_product_attention(q, k, v, valid, s1, block=block)

  def merged(q, k, v):
    ctx = attention.dot_product_attention(q, k[:, :s1], v[:, :s1], valid[:, :s1], s1, block=block, return_lse=True)
    own = attention.dot_product_attention(q, k[:, s1:], v[:, s1:], valid[:, s1:], 0, block=block, return_lse=True)
    return attention.merge(*ctx, *own)

  np.testing.assert_allclose(jax.jit(merged)(q, k, v), jax.jit(whole)(q, k, v), rtol=1e-5, atol=1e-5)
  w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v) for f in (merged, whole)]
  for a, r in zip(*grads):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))
  # lse itself: log Σ exp over the visible keys, against numpy (row 1 of the context has 5 left pads).
  _, lse = attention.dot_product_attention(q, k, v, valid, s1, block=block, return_lse=True)
  sc = np.einsum("btnh,bsnh->btns", q, np.repeat(k, n // kv, axis=2)) / np.sqrt(h)
  vis = valid[:, None, None, :] & (np.arange(s1 + t)[None, None, None, :] <= s1 + np.arange(t)[None, :, None, None])
  want = np.log(np.sum(np.where(vis, np.exp(sc), 0.0), axis=-1))
  np.testing.assert_allclose(lse, want, rtol=1e-5, atol=1e-5)


def test_empty_queries_or_keys():
  """T = 0 or S = 0 (an empty context): output 0, lse −1e30, whatever the block."""
  for t, s in ((0, 40), (40, 0), (3, 0)):
    q, k, v = jnp.ones((2, t, 4, 8)), jnp.ones((2, s, 2, 8)), jnp.ones((2, s, 2, 8))
    out, lse = attention.dot_product_attention(q, k, v, jnp.ones((2, s), bool), 0, block=16, return_lse=True)
    assert out.shape == (2, t, 4, 8) and not np.any(out) and lse.shape == (2, t, 4) and np.all(lse == -1e30)
