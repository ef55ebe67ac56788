"""Decoder: delta-rule forms vs a numpy loop, cache invariants, padding, broadcast, gradients.

HF parity: tests/test_hf_parity.py; loading/export/config errors: tests/test_hf.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import model as M
from dreamjax.model import deltanet, layout

PRESETS = ["qwen3-tiny", "qwen3_5-tiny"]


@functools.lru_cache(maxsize=None)
def fwd(config):
  """Returns jit(forward) -> (logits, cache)."""
  f = jax.jit(functools.partial(M.forward, config=config))
  return lambda *a: f(*a)[:2]


@functools.lru_cache(maxsize=None)
def prefill_fn(config, capacity):
  return jax.jit(functools.partial(M.prefill, config=config, capacity=capacity))


@functools.lru_cache(maxsize=None)
def preset_params(name):
  """Returns (config, params) with O(1) logits and non-trivial norms (so the zero-centred form matters).

  std 0.05 keeps the random network's float32 noise floor (e.g. chunk size 16 vs 64: ~1e-6 apart)
  below the 1e-5 tolerance; at std 0.06-0.1 it is ~2e-5 (a 1e-7 relative change of the params
  already moves the logits that much), and a 1e-5 test there would fail on round-off alone.
  """
  cfg = M.ModelConfig.preset(name)
  params = M.init_params(cfg, jax.random.PRNGKey(7), std=0.05)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape) if x.ndim == 1 else x,
      params)
  return cfg, params


# --------------------------------------------------------------------------------------------
# The gated delta rule: chunked == recurrent == a naive numpy loop.


def np_delta_rule(q, k, v, g, beta, s0):
  """Naive float64 recurrence, written from the paper's equations (independent of the JAX code)."""
  b, t, hk, dk = q.shape
  hv, dv = v.shape[2], v.shape[3]
  rep = hv // hk
  s = s0.astype(np.float64).copy()
  out = np.zeros((b, t, hv, dv))
  for bi in range(b):
    for h in range(hv):
      for ti in range(t):
        qv = q[bi, ti, h // rep] / np.sqrt((q[bi, ti, h // rep] ** 2).sum() + 1e-6) / np.sqrt(dk)
        kv = k[bi, ti, h // rep] / np.sqrt((k[bi, ti, h // rep] ** 2).sum() + 1e-6)
        st = np.exp(g[bi, ti, h]) * s[bi, h]
        st = st + np.outer(kv, beta[bi, ti, h] * (v[bi, ti, h] - st.T @ kv))
        s[bi, h] = st
        out[bi, ti, h] = st.T @ qv
  return out, s


def test_unit_lower_inverse_and_its_gradient():
  rng = np.random.default_rng(0)
  n = np.tril(rng.normal(size=(3, 11, 11)) * 0.5, -1)
  x = deltanet.unit_lower_inverse(jnp.asarray(n, jnp.float32))
  np.testing.assert_allclose(x, np.linalg.inv(np.eye(11) + n), atol=1e-4, rtol=1e-4)
  w = jnp.asarray(rng.normal(size=(3, 11, 11)), jnp.float32)
  loss = lambda inv: lambda m: jnp.sum(w * inv(m))
  got = jax.grad(loss(deltanet.unit_lower_inverse))(jnp.asarray(n, jnp.float32))
  want = jax.grad(loss(lambda m: jnp.linalg.inv(jnp.eye(11) + m)))(jnp.asarray(n, jnp.float32))
  np.testing.assert_allclose(got, np.tril(want, -1), atol=1e-4, rtol=1e-4)


recurrent = jax.jit(deltanet.recurrent_delta_rule)
chunked = jax.jit(deltanet.chunked_delta_rule, static_argnames="chunk_size")


@pytest.mark.parametrize("t,chunk", [(1, 16), (13, 16), (37, 16), (71, 64)])  # < chunk, > chunk, ragged
def test_delta_rule_forms_agree(t, chunk):
  rng = np.random.default_rng(t)
  b, hk, hv, dk, dv = 2, 2, 6, 5, 3  # grouped value heads (3 per key head), dk != dv
  q, k = rng.normal(size=(b, t, hk, dk)), rng.normal(size=(b, t, hk, dk))
  v = rng.normal(size=(b, t, hv, dv))
  g = -rng.uniform(0.01, 1.5, size=(b, t, hv))
  beta = rng.uniform(0.05, 0.95, size=(b, t, hv))
  s0 = rng.normal(size=(b, hv, dk, dv)) * 0.3
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, s0)]
  o_r, s_r = recurrent(*args)
  o_c, s_c = chunked(*args, chunk_size=chunk)
  o_np, s_np = np_delta_rule(q, k, v, g, beta, s0)
  np.testing.assert_allclose(o_r, o_np, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s_r, s_np, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(o_c, o_np, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s_c, s_np, atol=1e-5, rtol=1e-5)
  # Splitting the sequence anywhere and carrying the state gives the same outputs.
  cut = max(t // 2, 1)
  o1, s1 = chunked(*[x[:, :cut] for x in args[:5]], args[5], chunk_size=chunk)
  if cut < t:
    o2, s1 = recurrent(*[x[:, cut:] for x in args[:5]], s1)
    o1 = jnp.concatenate([o1, o2], axis=1)
  np.testing.assert_allclose(o1, o_np, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s1, s_np, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Cache invariants.


def _batch(cfg, b, t, seed):
  toks = jax.random.randint(jax.random.PRNGKey(seed), (b, t), 3, cfg.vocab_size)
  return toks, jnp.ones_like(toks)


@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_continue_equals_one_forward(name):
  cfg, params = preset_params(name)
  toks, mask = _batch(cfg, 3, 41, 0)
  # Left-pad the contexts differently per row; the continuation is right-padded.
  ctx_len = 23
  mask = mask.at[0, :4].set(0).at[2, :9].set(0)  # left pads inside the context
  mask = mask.at[1, 38:].set(0)  # right pads at the end of the continuation
  pos = M.positions_from_mask(mask)
  full, _ = fwd(cfg)(params, toks, pos, mask)
  cache = prefill_fn(cfg, 48)(params, toks[:, :ctx_len], pos[:, :ctx_len], mask[:, :ctx_len])
  cont, cache2 = fwd(cfg)(params, toks[:, ctx_len:], pos[:, ctx_len:], mask[:, ctx_len:], cache)
  real = np.asarray(mask[:, ctx_len:], bool)
  np.testing.assert_allclose(np.asarray(cont)[real], np.asarray(full[:, ctx_len:])[real], atol=1e-5, rtol=1e-5)
  assert int(cache2.end) == 41
  # Token-by-token decoding (the recurrent DeltaNet path) continues from the same cache.
  c = cache
  for i in range(ctx_len, ctx_len + 5):
    step, c = fwd(cfg)(params, toks[:, i : i + 1], pos[:, i : i + 1], mask[:, i : i + 1], c)
    np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_padded_batch_equals_each_example_alone(name):
  cfg, params = preset_params(name)
  lens = [(7, 5), (12, 3), (3, 9)]  # (context, response) per example
  c_max, r_max = 12, 9
  rng = np.random.default_rng(1)
  rows, masks, alone = [], [], []
  for c, r in lens:
    seq = rng.integers(3, cfg.vocab_size, size=c + r)
    toks = np.zeros(c_max + r_max, np.int32)
    m = np.zeros_like(toks)
    toks[c_max - c : c_max + r] = seq  # context left-padded, response right-padded
    m[c_max - c : c_max + r] = 1
    rows.append(toks)
    masks.append(m)
    # Alone: a batch of one, unpadded at the front (right-padded to one length: one compile).
    one = np.zeros((1, c_max + r_max), np.int32)
    one[0, : c + r] = seq
    ones = jnp.asarray(one > 0, jnp.int32).at[0, : c + r].set(1)
    lo, _ = fwd(cfg)(params, jnp.asarray(one), M.positions_from_mask(ones), ones)
    alone.append(np.asarray(lo[0, : c + r]))
  toks, mask = jnp.asarray(np.stack(rows)), jnp.asarray(np.stack(masks))
  batched, _ = fwd(cfg)(params, toks, M.positions_from_mask(mask), mask)
  for i, (c, r) in enumerate(lens):
    np.testing.assert_allclose(np.asarray(batched[i])[c_max - c : c_max + r], alone[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_broadcast_cache_serves_k_continuations(name):
  cfg, params = preset_params(name)
  ctx, cmask = _batch(cfg, 2, 11, 3)
  cpos = M.positions_from_mask(cmask)
  cache = prefill_fn(cfg, 17)(params, ctx, cpos, cmask)
  assert cache.batch_size == 2
  k = 3
  cont = jax.random.randint(jax.random.PRNGKey(9), (2 * k, 6), 3, cfg.vocab_size)
  cont_mask = jnp.ones_like(cont)
  cont_pos = 11 + jnp.broadcast_to(jnp.arange(6), cont.shape)
  wide = M.broadcast_cache(cache, k)
  assert all(x.shape[1] == 2 * k for x in jax.tree.leaves(wide.layers)) and wide.batch_size == 2 * k
  got, _ = fwd(cfg)(params, cont, cont_pos, cont_mask, wide)
  # Reference: each continuation run after its context in one full forward.
  full_toks = jnp.concatenate([jnp.repeat(ctx, k, axis=0), cont], axis=1)
  ones = jnp.ones_like(full_toks)
  want, _ = fwd(cfg)(params, full_toks, M.positions_from_mask(ones), ones)
  # Two float32 paths (chunked prefill + recurrent continuation vs one chunked pass) differ by
  # round-off that depends on the CPU's vector width (seen: 1.4e-5 on a logit of 0.088); a cache
  # served to the wrong continuation moves them by O(1) (the cache tiled instead of repeated: 1.8).
  np.testing.assert_allclose(got, want[:, 11:], atol=5e-5, rtol=1e-4)


def test_gradient_flows_through_cached_continuation():
  cfg, params = preset_params("qwen3_5-tiny")
  ctx, cmask = _batch(cfg, 2, 9, 4)
  cache = prefill_fn(cfg, 14)(jax.lax.stop_gradient(params), ctx, M.positions_from_mask(cmask), cmask)
  resp, rmask = _batch(cfg, 2, 5, 5)
  rmask = rmask.at[1, 3:].set(0)  # a right-padded response

  def loss(p):
    lo = M.forward(p, resp, 9 + M.positions_from_mask(rmask), rmask, cache, config=cfg).logits
    return jnp.sum(jax.nn.log_softmax(lo)[..., 5] * rmask)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  _, grads = value_and_grad(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # Every layer's weights get gradient through the response tokens' own computation.
  for i, layer in enumerate(layout.unstack(grads, cfg)):
    g = layer["linear_attn"]["in_proj_qkv"] if cfg.layer_types[i] == M.LINEAR else layer["attn"]["q_proj"]
    assert float(jnp.linalg.norm(g)) > 0, i
  # Directional derivative vs central differences (agree to ~0.3% here in float32; 1% is plenty
  # to catch a missing or wrong gradient path).
  per_layer = dict(params, layers=layout.unstack(params, cfg))  # a direction drawn per layer, then stacked
  u = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape), per_layer)
  u = dict(u, layers=layout.stack(u["layers"], cfg))
  eps = 1e-4
  f = lambda t: value_and_grad(jax.tree.map(lambda p, d: p + t * d, params, u))[0]
  fd = (f(eps) - f(-eps)) / (2 * eps)
  an = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(u)))
  np.testing.assert_allclose(an, fd, rtol=1e-2)


def test_cache_capacity_is_checked():
  cfg, params = preset_params("qwen3-tiny")
  toks, mask = _batch(cfg, 1, 9, 0)
  with pytest.raises(ValueError, match="do not fit a cache of capacity 8"):
    M.prefill(params, toks, M.positions_from_mask(mask), mask, config=cfg, capacity=8)


@pytest.mark.parametrize("name", PRESETS)
def test_mlp_inputs_rebuild_each_layers_residual_in_numpy(name):
  """return_mlp_inputs: with u_i the MLP input and h_i the residual into layer i, numpy's
  SwiGLU gives the post-attention residual m_i = h_{i+1} − mlp(u_i), and u_i must equal RMSNorm(m_i)."""
  cfg, params = preset_params(name)
  toks, mask = _batch(cfg, 2, 11, 3)
  logits, _, _, hidden, mlp_in = M.forward(params, toks, M.positions_from_mask(mask), mask, config=cfg,
                                           return_hidden=True, return_mlp_inputs=True)
  plain, _ = fwd(cfg)(params, toks, M.positions_from_mask(mask), mask)
  np.testing.assert_allclose(logits, plain, atol=1e-5)
  assert len(mlp_in) == cfg.num_layers
  silu = lambda x: x / (1.0 + np.exp(-x))
  for i, layer in enumerate(layout.unstack(params, cfg)):
    p = jax.tree.map(np.asarray, layer)
    u = np.asarray(mlp_in[i], np.float64)
    mid = np.asarray(hidden[i + 1], np.float64) - (silu(u @ p["mlp"]["gate_proj"]) * (u @ p["mlp"]["up_proj"])) @ p["mlp"]["down_proj"]
    w = p["post_attention_norm"] + (1.0 if cfg.norm_zero_centered else 0.0)
    want = mid / np.sqrt(np.mean(mid ** 2, -1, keepdims=True) + cfg.rms_norm_eps) * w
    np.testing.assert_allclose(u, want, atol=2e-4, rtol=1e-3)


def test_dropout_zeroes_at_its_rate_and_keeps_the_expectation():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(211, 37)), jnp.float32)
  y = np.asarray(M.decoder.dropout(x, 0.3, jax.random.PRNGKey(1)))
  dropped = y == 0
  n = dropped.size
  assert abs(dropped.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)  # binomial, 4 sigma
  np.testing.assert_allclose(y[~dropped], np.asarray(x)[~dropped] / 0.7, rtol=1e-6)
  mean = np.mean([np.asarray(M.decoder.dropout(x, 0.3, jax.random.PRNGKey(k))) for k in range(400)], axis=0)
  assert np.abs(mean - np.asarray(x)).mean() < 0.05 * np.abs(np.asarray(x)).mean() + 0.05
  np.testing.assert_array_equal(M.decoder.dropout(x, 0.0, jax.random.PRNGKey(1)), x)
  np.testing.assert_array_equal(M.decoder.dropout(x, 0.3, None), x)
  with pytest.raises(ValueError, match="dropout"):
    M.decoder.dropout(x, 1.0, jax.random.PRNGKey(1))


@pytest.mark.parametrize("name", PRESETS)
def test_forward_dropout_is_keyed_and_off_at_rate_zero(name):
  cfg, params = preset_params(name)
  toks, mask = _batch(cfg, 2, 9, 4)
  pos = M.positions_from_mask(mask)
  plain, _ = fwd(cfg)(params, toks, pos, mask)
  f = jax.jit(functools.partial(M.forward, config=cfg, dropout_rate=0.2))
  a = f(params, toks, pos, mask, dropout_key=jax.random.PRNGKey(0)).logits
  b = f(params, toks, pos, mask, dropout_key=jax.random.PRNGKey(0)).logits
  c = f(params, toks, pos, mask, dropout_key=jax.random.PRNGKey(1)).logits
  np.testing.assert_array_equal(a, b)  # a key fixes the masks
  assert not np.allclose(a, c) and not np.allclose(a, plain)
  off = M.forward(params, toks, pos, mask, config=cfg, dropout_rate=0.0, dropout_key=jax.random.PRNGKey(0)).logits
  np.testing.assert_allclose(off, plain, atol=1e-5, rtol=1e-5)  # eager vs jit round-off
  # Residual dropout acts on the branch outputs: the embedding entering layer 0 is untouched.
  hidden = M.forward(params, toks, pos, mask, config=cfg, return_hidden=True, dropout_rate=0.2,
                     dropout_key=jax.random.PRNGKey(0)).hidden
  hidden0 = M.forward(params, toks, pos, mask, config=cfg, return_hidden=True).hidden
  np.testing.assert_array_equal(hidden[0], hidden0[0])  # the embedding is not dropped


# --------------------------------------------------------------------------------------------
# Long-context paths: chunked prefill, the layer scan, blockwise attention inside the model.


def test_block_pattern_is_the_shortest_repeat():
  q35 = M.ModelConfig.preset("qwen3_5-tiny")
  assert M.ModelConfig.preset("qwen3-tiny").block_pattern == (M.FULL,)
  assert q35.block_pattern == (M.LINEAR, M.FULL, M.LINEAR) and q35.num_blocks == 1  # repeats nothing
  hybrid = q35.replace(num_layers=8, layer_types=(M.LINEAR,) * 3 + (M.FULL,) + (M.LINEAR,) * 3 + (M.FULL,))
  assert hybrid.block_pattern == (M.LINEAR,) * 3 + (M.FULL,) and hybrid.num_blocks == 2
  assert hybrid.layer_kinds == (M.FULL, M.LINEAR)


@pytest.mark.parametrize("name,chunk", [("qwen3-tiny", 5), ("qwen3_5-tiny", 4), ("qwen3_5-tiny", 7)])
def test_chunked_prefill_equals_one_shot(name, chunk):
  """The context in chunks (a scan continuing the cache, left-padded to a multiple of the chunk)
  leaves the same K/V, DeltaNet state and conv tail as one call, and continues the same."""
  cfg, params = preset_params(name)
  toks, mask = _batch(cfg, 3, 30, 11)
  mask = mask.at[0, :6].set(0).at[2, :13].set(0)  # left-padded contexts of different lengths
  pos = M.positions_from_mask(mask)
  ctx = 23
  one = prefill_fn(cfg.replace(prefill_chunk=0), 30)(params, toks[:, :ctx], pos[:, :ctx], mask[:, :ctx])
  chunked = prefill_fn(cfg.replace(prefill_chunk=chunk), 30)(params, toks[:, :ctx], pos[:, :ctx], mask[:, :ctx])
  pad = (-ctx) % chunk
  assert chunked.capacity == 30 + pad and int(chunked.end) == ctx + pad and int(one.end) == ctx
  np.testing.assert_array_equal(chunked.valid_BxS[:, pad:], one.valid_BxS)
  for kind, layer in one.layers.items():
    other = chunked.layers[kind]
    if kind == M.FULL:  # K/V slots shifted by the pad
      for a, b in zip(layer, other):
        np.testing.assert_allclose(b[:, :, pad:], a, atol=1e-5, rtol=1e-5)
    else:
      for a, b in zip(layer, other):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
  cont = lambda c: fwd(cfg)(params, toks[:, ctx:], pos[:, ctx:], mask[:, ctx:], c)[0]
  np.testing.assert_allclose(cont(chunked), cont(one), atol=1e-5, rtol=1e-5)


def _hybrid_blocks():
  """A Qwen3.5-style stack of 3 blocks (DeltaNet, DeltaNet, attention), small attention blocks."""
  base = M.ModelConfig.preset("qwen3_5-tiny")
  cfg = base.replace(num_layers=6, layer_types=(M.LINEAR, M.LINEAR, M.FULL) * 2, attention_block=8)
  return cfg, M.init_params(cfg, jax.random.PRNGKey(5), std=0.05)


@pytest.mark.parametrize("remat", [True, "dots"])  # no remat: the hybrid parity test compares scan and loop
def test_scanned_blocks_equal_the_unrolled_stack(remat):
  """lax.scan over repeats of the block pattern vs the Python loop over the same blocks, with every
  remat policy: the same logits, cache and gradients; and layer i of the model is the i-th layer
  of the per-layer view (every block used once, in order)."""
  cfg, params = _hybrid_blocks()
  assert cfg.num_blocks == 2
  toks, mask = _batch(cfg, 2, 29, 8)  # 29 > attention_block: the blockwise loops run
  mask = mask.at[1, :4].set(0)
  pos = M.positions_from_mask(mask)
  cache = M.init_cache(cfg, 2, 33)

  def run(scan):
    c = cfg.replace(scan_layers=scan)
    f = lambda p: M.forward(p, toks, pos, mask, cache, config=c, remat=remat, return_hidden=True)
    loss = lambda p: jnp.sum(jax.nn.log_softmax(f(p).logits)[..., 3] * mask)
    return jax.jit(f)(params), jax.jit(jax.grad(loss))(params)

  (a, ga), (b, gb) = run(True), run(False)
  np.testing.assert_allclose(a.logits, b.logits, atol=2e-6, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-6), a.cache, b.cache)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6, rtol=2e-5), ga, gb)
  # The residual entering layer i + 1 is layer i applied (alone, no scan) to the residual entering i.
  cos, sin = M.decoder.rope_tables(pos, cfg)
  inp = M.decoder._Inputs(cos, sin, mask.astype(bool), M.decoder.Slots(mask.astype(bool), jnp.int32(0)), None, 0.0,
                          None)
  for i, (kind, p) in enumerate(zip(cfg.layer_types, layout.unstack(params, cfg))):
    x = M.decoder._layer(p, a.hidden[i], None, inp, kind=kind, index=i, config=cfg)[0]
    np.testing.assert_allclose(x, a.hidden[i + 1], atol=1e-5, rtol=1e-5, err_msg=f"layer {i}")
