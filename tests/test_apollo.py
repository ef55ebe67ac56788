"""APOLLO vs an independent numpy re-derivation of the reference (apollo-torch APOLLOAdamW)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreamjax import optim as apollo_lib

# ----------------------------------------------------------------------------------------------
# The reference, step by step, in float64 numpy (procedural, like the torch code).


def np_apollo_run(params0, grads, projections, cfg):
  """Returns the params after each step of reference APOLLO-AdamW.

  params0: dict with 'w' (projected), 'embed' (dense AdamW), 'b' (dense AdamW).
  projections: projections[t] = the float32 P in force at step t (for 'w').
  """
  b1, b2, eps = cfg["b1"], cfg["b2"], cfg["eps"]
  params = {k: np.array(v, np.float64) for k, v in params0.items()}
  state = {k: {} for k in params}
  history, limiter_fired = [], 0
  for t, g_all in enumerate(grads):
    lr = cfg["lr"](t) if callable(cfg["lr"]) else cfg["lr"]
    step = t + 1
    step_size = lr * np.sqrt(1 - b2**step) / (1 - b1**step)
    for name, p in params.items():
      g = np.array(g_all[name], np.float64)
      st = state[name]
      if name == "w":
        m, n = g.shape
        P = np.array(projections[t], np.float64)
        low = g @ P.T if m >= n else P.T @ g
        st.setdefault("M", np.zeros_like(low))
        st.setdefault("V", np.zeros_like(low))
        st["M"] = b1 * st["M"] + (1 - b1) * low
        st["V"] = b2 * st["V"] + (1 - b2) * low * low
        norm_grad = st["M"] / (np.sqrt(st["V"]) + eps)
        if cfg["scale_type"] == "channel":
          if m >= n:  # low is (m, r): one factor per row, norm over the rank axis
            s = np.sqrt((norm_grad**2).sum(1)) / (np.sqrt((low**2).sum(1)) + 1e-8)
            s = s[:, None]
          else:  # low is (r, n): one factor per column
            s = np.sqrt((norm_grad**2).sum(0)) / (np.sqrt((low**2).sum(0)) + 1e-8)
            s = s[None, :]
        else:
          s = np.sqrt((norm_grad**2).sum()) / (np.sqrt((low**2).sum()) + 1e-8)
        u = g * s
        if cfg["limit"] is not None:
          if "prev" in st:
            un = np.sqrt((u**2).sum())
            lim = max(un / (st["prev"] + 1e-8), cfg["limit"]) / cfg["limit"]
            limiter_fired += lim > 1.0
            u = u / lim
            st["prev"] = un / lim
          else:
            st["prev"] = np.sqrt((u**2).sum())
        u = u * np.sqrt(cfg["scale"])
        p = p - step_size * u
      else:
        st.setdefault("M", np.zeros_like(g))
        st.setdefault("V", np.zeros_like(g))
        st["M"] = b1 * st["M"] + (1 - b1) * g
        st["V"] = b2 * st["V"] + (1 - b2) * g * g
        p = p - step_size * st["M"] / (np.sqrt(st["V"]) + eps)
      p = p - lr * cfg["wd"] * p  # decoupled decay of the updated weight
      params[name] = p
    history.append({k: v.copy() for k, v in params.items()})
  return history, limiter_fired


# ----------------------------------------------------------------------------------------------


def make_problem(shape, n_steps, dtype, seed):
  rng = np.random.default_rng(seed)
  m, n = shape
  params0 = {
      "w": rng.normal(size=shape),
      "embed": rng.normal(size=(11, n)),
      "b": rng.normal(size=(n,)),
  }
  # Growing gradients (so the norm-growth limiter fires) with a fresh direction every step.
  grads = [
      {k: (1.0 + 0.6 * t) * rng.normal(size=v.shape) for k, v in params0.items()} for t in range(n_steps)
  ]
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  return cast(params0), [cast(g) for g in grads], params0, grads


def run_jax(opt, params, grads, jit=True):
  state = opt.init(params)
  update = jax.jit(opt.update) if jit else opt.update
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state


def projections_for(seed, shape, rank, n_steps, gap):
  """The P the optimizer uses at each step: regenerated from the leaf key and refresh index."""
  leaf_key = apollo_lib.path_key(jax.random.PRNGKey(seed), (jax.tree_util.DictKey("w"),))
  side = apollo_lib.projection_side(shape)
  return [
      np.asarray(
          apollo_lib.gaussian_projection(apollo_lib.projection_key(leaf_key, t // gap), shape, rank, side)
      )
      for t in range(n_steps)
  ]


SHAPES = [(7, 5), (5, 7), (6, 6), (13, 3), (3, 13), (11, 17), (17, 11)]
CONFIGS = [
    dict(shape=s, rank=r, scale_type=st, scale=sc, wd=wd)
    for (s, r, st, sc, wd) in itertools.product(SHAPES, (1, 2), ("channel", "tensor"), (1.0, 32.0, 128.0), (0.0, 0.1))
]
# 168 combinations; a fixed, well-spread subset of 36 keeps the suite fast.
CONFIGS = [CONFIGS[i] for i in range(0, len(CONFIGS), 168 // 36 + 1)] + [
    dict(shape=(6, 6), rank=3, scale_type="channel", scale=1.0, wd=0.1),
    dict(shape=(3, 13), rank=2, scale_type="tensor", scale=128.0, wd=0.1),
]


def _check(cfg, dtype, tol, n_steps=7, gap=2, lr=0.05, limit=1.01):
  seed = 3
  params, grads, params0_np, grads_np = make_problem(cfg["shape"], n_steps, dtype, seed)
  opt = apollo_lib.apollo(
      lr,
      rank=cfg["rank"],
      scale_type=cfg["scale_type"],
      scale=cfg["scale"],
      update_proj_gap=gap,
      weight_decay=cfg["wd"],
      norm_growth_limit=limit,
      key=seed,
  )
  got, _ = run_jax(opt, params, grads, jit=False)
  P = projections_for(seed, cfg["shape"], cfg["rank"], n_steps, gap)
  ref_cfg = dict(b1=0.9, b2=0.999, eps=1e-6, lr=lr, wd=cfg["wd"], scale=cfg["scale"],
                 scale_type=cfg["scale_type"], limit=limit)
  want, fired = np_apollo_run(params0_np, grads_np, P, ref_cfg)
  for t in range(n_steps):
    for name in ("w", "embed", "b"):
      delta_got = np.asarray(got[t][name], np.float64) - params0_np[name]
      delta_want = want[t][name] - params0_np[name]
      err = np.linalg.norm(delta_got - delta_want) / np.linalg.norm(delta_want)
      assert err <= tol, (cfg, t, name, err)
  return fired


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_matches_reference_float64(cfg):
  with jax.enable_x64(True):
    fired = _check(cfg, jnp.float64, 1e-6)
  assert fired > 0, "the gradients grow, so the limiter must fire in this test"


@pytest.mark.parametrize("cfg", CONFIGS[::4], ids=lambda c: "-".join(map(str, c.values())))
def test_matches_reference_float32(cfg):
  _check(cfg, jnp.float32, 1e-4)


def test_matches_reference_without_limiter_and_with_schedule():
  cfg = dict(shape=(11, 17), rank=2, scale_type="channel", scale=32.0, wd=0.1)
  sched = optax.linear_schedule(0.08, 0.01, 6)
  with jax.enable_x64(True):
    _check(cfg, jnp.float64, 1e-6, limit=None, lr=sched)


def test_state_size_is_two_r_max_mn():
  params = {"w1": jnp.zeros((37, 11)), "w2": jnp.zeros((5, 29)), "embed": jnp.zeros((53, 11)), "n": jnp.zeros(11)}
  rank = 3
  state = apollo_lib.scale_by_apollo(rank=rank).init({"w1": params["w1"], "w2": params["w2"]})
  assert state.mu["w1"].shape == (37, rank) and state.mu["w2"].shape == (rank, 29)
  moment_numbers = sum(x.size for x in jax.tree.leaves((state.mu, state.nu)))
  assert moment_numbers == 2 * rank * 37 + 2 * rank * 29
  other = sum(x.size for x in jax.tree.leaves((state.count, state.key, state.prev_norm)))
  assert other <= 1 + 2 * (2 + 1)  # count + per leaf (raw key + prev norm): O(1), no P
  # The full alias: projected leaves cost 2·r·max(m,n), the rest full AdamW moments.
  full = apollo_lib.apollo(1e-3, rank=rank).init(params)
  total = sum(x.size for x in jax.tree.leaves(full) if x.ndim > 0 and x.dtype != jnp.uint32)
  assert total == 2 * rank * (37 + 29) + 2 * (53 * 11 + 11)


def test_mini_is_rank1_tensor_scale128():
  params = {"w": jnp.zeros((7, 5))}
  state = apollo_lib.apollo_mini(1e-3).init(params)
  inner = state[0].inner_states["apollo"].inner_state
  assert inner.mu["w"].shape == (7, 1)
  # Same numbers as the explicit configuration.
  g = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)}
  a, _ = apollo_lib.apollo_mini(1e-2).update(g, state, params)
  b_opt = apollo_lib.apollo(1e-2, rank=1, scale_type="tensor", scale=128.0)
  b, _ = b_opt.update(g, b_opt.init(params), params)
  np.testing.assert_array_equal(a["w"], b["w"])


def test_projection_refresh_schedule_and_keys():
  shape, gap = (9, 4), 3
  leaf_key = apollo_lib.path_key(jax.random.PRNGKey(0), (jax.tree_util.DictKey("w"),))
  P = [apollo_lib.gaussian_projection(apollo_lib.projection_key(leaf_key, t // gap), shape, 2, "right") for t in range(7)]
  assert P[0].shape == (2, 4)
  np.testing.assert_array_equal(P[0], P[2])
  assert not np.allclose(P[2], P[3])
  # P ~ N(0, 1/r): check the variance on a big draw.
  big = apollo_lib.gaussian_projection(jax.random.PRNGKey(1), (4000, 500), 4, "right")
  assert abs(float(jnp.var(big)) - 0.25) < 0.01
  # Different leaves get different keys; the same path gets the same key in any tree.
  k1 = apollo_lib.path_key(jax.random.PRNGKey(0), (jax.tree_util.DictKey("a"),))
  k2 = apollo_lib.path_key(jax.random.PRNGKey(0), (jax.tree_util.DictKey("b"),))
  assert not np.array_equal(k1, k2)


def test_injected_projection_fn_is_used():
  calls = []

  def ones_projection(key, shape, rank, side):
    calls.append((shape, rank, side))
    m, n = shape
    return jnp.ones((rank, n) if side == "right" else (m, rank), jnp.float32)

  tx = apollo_lib.scale_by_apollo(rank=2, projection_fn=ones_projection, norm_growth_limit=None)
  g = {"w": jnp.arange(15.0).reshape(5, 3)}
  u, _ = tx.update(g, tx.init(g))
  assert calls == [((5, 3), 2, "right")]
  # With P = ones, both rank rows of R equal the row sums; first step: R~ = (1-b1)R/(sqrt(1-b2)|R|+eps).
  r = np.asarray(g["w"]).sum(1, keepdims=True).repeat(2, 1)
  rt = 0.1 * r / (np.sqrt(0.001) * np.abs(r) + 1e-6)
  s = np.linalg.norm(rt, axis=1, keepdims=True) / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-8)
  want = np.asarray(g["w"]) * s * np.sqrt(1 - 0.999) / (1 - 0.9)
  np.testing.assert_allclose(u["w"], want, rtol=1e-5)


def test_default_labels():
  params = {
      "embed": jnp.zeros((11, 5)),
      "lm_head": jnp.zeros((5, 11)),
      "w": jnp.zeros((5, 7)),
      "cube": jnp.zeros((2, 5, 7)),  # 3-D outside 'layers': not a matrix
      # Stacked layers: a leading layer axis, then the layer's own shape.
      "layers": {"attn": {"q_proj": jnp.zeros((3, 5, 7)), "q_norm": jnp.zeros((3, 7))},
                 "input_norm": jnp.zeros((3, 5)), "A_log": jnp.zeros((3, 4)), "conv_weight": jnp.zeros((3, 3, 7))},
  }
  labels = apollo_lib.default_label_fn(params)
  assert labels == {
      "embed": "adam", "lm_head": "adam", "w": "apollo", "cube": "adam",
      "layers": {"attn": {"q_proj": "apollo", "q_norm": "adam"}, "input_norm": "adam", "A_log": "adam",
                 "conv_weight": "adam"},
  }
  # A list of per-layer dicts under 'layers' is not a stack: its matrices are plain 2-D leaves.
  per_layer = {"layers": [{"q_proj": jnp.zeros((5, 7)), "norm": jnp.zeros((7,))}]}
  assert apollo_lib.default_label_fn(per_layer) == {"layers": [{"q_proj": "apollo", "norm": "adam"}]}


def test_stacked_leaf_is_each_layer_updated_on_its_own():
  """A stacked (L, m, n) leaf under 'layers' is L matrices: with the per-matrix keys its state holds,
  L separate 2-D leaves get the same updates (moments, channel or tensor scaling and the norm
  limiter per matrix), and the matrices get different projections."""
  rng = np.random.default_rng(11)
  n_layers, m, n = 3, 7, 5
  for kw in (dict(rank=2), dict(rank=1, scale_type="tensor", scale=128.0, key=jax.random.key(3))):  # raw, typed
    tx = apollo_lib.scale_by_apollo(update_proj_gap=2, **kw)
    stacked = tx.init({"layers": {"w": jnp.zeros((n_layers, m, n))}})
    assert stacked.mu["layers"]["w"].shape[0] == n_layers and stacked.prev_norm["layers"]["w"].shape == (n_layers,)
    keys = stacked.key["layers"]["w"]
    raw = jax.random.key_data(keys) if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
    assert len({tuple(np.asarray(k)) for k in raw}) == n_layers
    alone = tx.init({f"w{i}": jnp.zeros((m, n)) for i in range(n_layers)})
    alone = alone._replace(key={f"w{i}": keys[i] for i in range(n_layers)})
    update = jax.jit(tx.update)
    for t in range(5):  # crosses a projection refresh (gap 2)
      g = jnp.asarray(rng.normal(size=(n_layers, m, n)) * (1 + t), jnp.float32)
      u_stacked, stacked = update({"layers": {"w": g}}, stacked)
      u_alone, alone = update({f"w{i}": g[i] for i in range(n_layers)}, alone)
      for i in range(n_layers):
        np.testing.assert_allclose(u_stacked["layers"]["w"][i], u_alone[f"w{i}"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stacked.mu["layers"]["w"][i], alone.mu[f"w{i}"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stacked.prev_norm["layers"]["w"][i], alone.prev_norm[f"w{i}"], rtol=1e-5)


def test_jit_update_does_not_recompile():
  traces = []
  opt = apollo_lib.apollo(optax.cosine_decay_schedule(1e-2, 10), rank=2, weight_decay=0.1)

  def update(g, s, p):
    traces.append(1)
    return opt.update(g, s, p)

  update_jit = jax.jit(update)
  params = {"w": jnp.ones((7, 5)), "b": jnp.ones(5)}
  state = opt.init(params)
  for _ in range(3):
    u, state = update_jit(jax.tree.map(jnp.ones_like, params), state, params)
  assert len(traces) == 1


def test_bf16_params_with_float32_moments():
  rng = np.random.default_rng(0)
  p32 = {"w": jnp.asarray(rng.normal(size=(13, 7)), jnp.float32), "b": jnp.zeros(7)}
  g32 = {"w": jnp.asarray(rng.normal(size=(13, 7)), jnp.float32), "b": jnp.ones(7)}
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g32)
  opt = apollo_lib.apollo(1e-2, rank=2, mu_dtype=jnp.float32)
  state = opt.init(p16)
  inner = state[0].inner_states["apollo"].inner_state
  assert inner.mu["w"].dtype == jnp.float32
  u16, _ = jax.jit(opt.update)(g16, state, p16)
  assert u16["w"].dtype == jnp.bfloat16
  u32, _ = opt.update(g32, opt.init(p32), p32)
  np.testing.assert_allclose(np.asarray(u16["w"], np.float32), u32["w"], rtol=0.05, atol=1e-4)


def test_save_restore_is_deterministic(tmp_path):
  import orbax.checkpoint as ocp

  params, grads, _, _ = make_problem((11, 7), 8, jnp.float32, seed=5)
  opt = apollo_lib.apollo(optax.linear_schedule(0.05, 0.0, 8), rank=2, update_proj_gap=3, weight_decay=0.1)
  update = jax.jit(opt.update)

  def run(params, state, gs):
    for g in gs:
      u, state = update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  full_params, _ = run(params, opt.init(params), grads)
  mid_params, mid_state = run(params, opt.init(params), grads[:4])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": mid_params, "opt": mid_state})
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": mid_params, "opt": mid_state})
  restored = ckpt.restore(tmp_path / "ckpt", abstract)
  resumed_params, _ = run(restored["params"], restored["opt"], grads[4:])
  for k in full_params:
    np.testing.assert_array_equal(np.asarray(full_params[k]), np.asarray(resumed_params[k]))


def test_rejects_non_matrix_leaf():
  tx = apollo_lib.scale_by_apollo(rank=2)
  with pytest.raises(ValueError, match=r"\['v'\].*only matrices \(2-D\)"):
    tx.init({"v": jnp.zeros(5)})
  with pytest.raises(ValueError, match=r"\['layers'\]\['v'\].*only matrices \(stacked 2-D\)"):
    tx.init({"layers": {"v": jnp.zeros((3, 5))}})


def test_leaves_sharing_a_shape_get_their_own_projection():
  """P is drawn per shape group in one vmapped call: each leaf must still get its own key's P."""
  rng = np.random.default_rng(3)
  tree = {"a": rng.normal(size=(7, 5)), "b": rng.normal(size=(7, 5)), "c": rng.normal(size=(5, 11))}
  tree = {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
  tx = apollo_lib.scale_by_apollo(rank=3, update_proj_gap=2)
  together = tx.init(tree)
  alone = {k: tx.init({k: v}) for k, v in tree.items()}
  for t in range(4):
    g = jax.tree.map(lambda x: jnp.sin((t + 2) * x), tree)
    u, together = tx.update(g, together)
    for k in tree:
      u_k, alone[k] = tx.update({k: g[k]}, alone[k])
      np.testing.assert_array_equal(u[k], u_k[k])
  assert not np.allclose(u["a"] / g["a"], u["b"] / g["b"])  # same shape, different P → different scales
