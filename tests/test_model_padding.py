"""Padding anywhere in a row changes nothing: not the real tokens' logits, not the cache state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import model as M
from dreamjax.model import deltanet


@functools.lru_cache(maxsize=None)
def setup(name):
  cfg = M.ModelConfig.preset(name)
  params = M.init_params(cfg, jax.random.PRNGKey(11), std=0.05)  # logits O(1)
  f = jax.jit(functools.partial(M.forward, config=cfg))
  return cfg, params, lambda *a: f(*a)[:2]  # (logits, cache)


def scatter_with_pads(seq, layout):
  """Returns (tokens, mask) of length len(layout): layout 1 takes the next real token, 0 a pad."""
  it = iter(seq)
  toks = [next(it) if m else 0 for m in layout]
  return np.asarray(toks, np.int32), np.asarray(layout, np.int32)


def test_causal_conv_skips_pads_and_keeps_the_last_real_inputs():
  rng = np.random.default_rng(0)
  k, c = 4, 5
  w = jnp.asarray(rng.normal(size=(k, c)), jnp.float32)
  tail = jnp.asarray(rng.normal(size=(1, k - 1, c)), jnp.float32)
  real = rng.normal(size=(1, 6, c))
  layout = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0])  # pads between, after and around
  x = np.zeros((1, len(layout), c))
  x[0, layout == 1] = real[0]
  out, new_tail = deltanet.causal_conv(jnp.asarray(x, jnp.float32), w, tail, jnp.asarray(layout[None]))
  # Independent reference: the plain definition over [tail, real inputs] without pads.
  seq = np.concatenate([np.asarray(tail[0]), real[0]])
  want = np.stack([sum(np.asarray(w)[j] * seq[i + j] for j in range(k)) for i in range(6)])
  want = want / (1 + np.exp(-want))  # silu
  np.testing.assert_allclose(np.asarray(out[0])[layout == 1], want, atol=1e-5)
  np.testing.assert_allclose(new_tail[0], seq[-(k - 1):], atol=1e-6)
  assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3_5-tiny"])
def test_pads_anywhere_in_a_row_leave_real_logits_unchanged(name):
  cfg, params, fwd = setup(name)
  rng = np.random.default_rng(2)
  seq = rng.integers(3, cfg.vocab_size, size=19)
  layout = np.ones(29, np.int32)
  layout[[0, 1, 6, 7, 8, 13, 20, 21, 27, 28]] = 0  # 19 real tokens, pads at the start, inside, end
  toks, mask = scatter_with_pads(seq, layout)
  toks, mask = jnp.asarray(toks[None]), jnp.asarray(mask[None])
  got, _ = fwd(params, toks, M.positions_from_mask(mask), mask)
  ones = jnp.ones((1, 19), jnp.int32)
  want, _ = fwd(params, jnp.asarray(seq[None], jnp.int32), M.positions_from_mask(ones), ones)
  np.testing.assert_allclose(np.asarray(got[0])[layout == 1], want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3_5-tiny"])
def test_right_padded_prefill_then_continue_equals_unpadded(name):
  """A context with trailing pads leaves the same cache state (conv tail, recurrent state, K/V)."""
  cfg, params, fwd = setup(name)
  rng = np.random.default_rng(3)
  ctx = rng.integers(3, cfg.vocab_size, size=(2, 13))
  cont = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 7)), jnp.int32)
  cmask = np.ones((2, 17), np.int32)
  cmask[0, 13:] = 0  # row 0: 13 real tokens then 4 pads
  cmask[1, :2], cmask[1, 15:] = 0, 0  # row 1: left and right pads
  ctoks = np.zeros((2, 17), np.int32)
  ctoks[cmask == 1] = ctx.reshape(-1)
  ctoks, cmask = jnp.asarray(ctoks), jnp.asarray(cmask)
  pf = jax.jit(functools.partial(M.prefill, config=cfg, capacity=24))
  cache = pf(params, ctoks, M.positions_from_mask(cmask), cmask)
  cont_pos = 13 + jnp.broadcast_to(jnp.arange(7), (2, 7))
  got, _ = fwd(params, cont, cont_pos, jnp.ones_like(cont), cache)
  full = jnp.concatenate([jnp.asarray(ctx, jnp.int32), cont], axis=1)
  ones = jnp.ones_like(full)
  want, _ = fwd(params, full, M.positions_from_mask(ones), ones)
  np.testing.assert_allclose(got, want[:, 13:], atol=1e-5, rtol=1e-5)
