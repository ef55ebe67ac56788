"""The train step: frozen vs full equivalences, mixed batches, sharding on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreamjax import model as M
from dreamjax import objectives
from dreamjax import optim
from dreamjax.train import batch as batch_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import step as step_lib

PRESETS = ["qwen3-tiny", "qwen3_5-tiny"]
# ':blocks' runs the long-context paths at test sizes: blockwise attention in blocks of 4 (so its
# loops and custom backward run) and the frozen context prefilled in chunks of 5.
LONG = "qwen3_5-tiny:blocks"


@functools.lru_cache(maxsize=None)
def setup(name):
  preset, _, variant = name.partition(":")
  cfg = M.ModelConfig.preset(preset)
  if variant == "blocks":
    cfg = cfg.replace(attention_block=4, prefill_chunk=5)
  params = M.init_params(cfg, jax.random.PRNGKey(0), std=0.1)
  return cfg, params


def make_batch(cfg, seed, b=3, c=9, r=6, general=1, ctx_lens=None):
  rng = np.random.default_rng(seed)
  exs = []
  for i in range(b):
    n_ctx = ctx_lens[i] if ctx_lens else int(rng.integers(2, c + 1))
    ctx = rng.integers(3, cfg.vocab_size, n_ctx).tolist()
    chosen = rng.integers(3, cfg.vocab_size, int(rng.integers(2, r + 1))).tolist()
    rejected = rng.integers(3, cfg.vocab_size, int(rng.integers(2, r + 1))).tolist()
    if i >= b - general:
      exs.append(batch_lib.general_example(ctx + chosen))
    else:
      exs.append(batch_lib.TokenizedExample(ctx, chosen, rejected))
  return batch_lib.collate(exs, c if general == 0 else c + r, r)


def loss_and_grad(cfg, params, batch, mode, objective="orpo"):
  fn = functools.partial(step_lib.batch_loss, config=cfg, objective=objective, gradient_mode=mode)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)


@pytest.mark.parametrize("name", PRESETS)
def test_frozen_and_full_give_the_same_loss_and_metrics(name):
  cfg, params = setup(name)
  batch = make_batch(cfg, 0, b=4, general=1)
  (lf, mf), gf = loss_and_grad(cfg, params, batch, "frozen")
  (lb, mb), gb = loss_and_grad(cfg, params, batch, "full")
  np.testing.assert_allclose(lf, lb, atol=1e-5)
  for k in mb:
    np.testing.assert_allclose(mf[k], mb[k], atol=1e-5, err_msg=k)
  # ... but not the same gradient: full mode also trains how the context is encoded.
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, gf, gb))
  assert diff > 1e-3 * optax.tree.norm(gb)


def stop_gradient_reference_loss(params, batch, *, cfg):
  """Full-sequence loss with stop_gradient on every context position but the last, at every layer.

  Written independently of the step's frozen path: one pass over [context, response[:-1]] for
  chosen and rejected each (no cache, no sharing), with the decoder's stop-gradient mask.
  """
  ctx, cmask = batch.context_BxC, batch.context_mask_BxC
  c = ctx.shape[1]
  out = []
  for resp, rmask in ((batch.chosen_BxR, batch.chosen_mask_BxR), (batch.rejected_BxR, batch.rejected_mask_BxR)):
    inp = jnp.concatenate([ctx, resp[:, :-1]], axis=1)
    imask = jnp.concatenate([cmask, rmask[:, :-1]], axis=1)
    frozen = jnp.broadcast_to(jnp.arange(inp.shape[1]) < c - 1, inp.shape)
    logits = M.forward(params, inp, M.positions_from_mask(imask), imask, config=cfg, stop_gradient_BxT=frozen).logits
    out.append(objectives.sequence_logprobs(logits[:, c - 1:], resp, rmask))
  lp = {"chosen": out[0], "rejected": out[1]}
  return step_lib.loss_from_logprobs(lp, batch.is_preference_B, objective="orpo")


@pytest.mark.parametrize("name", PRESETS + [LONG])
def test_frozen_gradient_equals_full_gradient_with_stopped_context(name):
  cfg, params = setup(name)
  batch = make_batch(cfg, 5, b=4, general=1)
  (lf, _), gf = loss_and_grad(cfg, params, batch, "frozen")
  (lb, _), gb = loss_and_grad(cfg, params, batch, "full")
  ref_fn = jax.jit(jax.value_and_grad(functools.partial(stop_gradient_reference_loss, cfg=cfg), has_aux=True))
  (lr, _), gr = ref_fn(params, batch)
  np.testing.assert_allclose(lf, lr, atol=1e-5)
  # Dense: float32 rounding only. Hybrid: its float32 backward differs by ~1e-4 of a leaf's scale
  # between the chunked (full) and prefill + continue (frozen) orders (see the sharding test).
  rel = 2e-5 if name.startswith("qwen3-") else 5e-4
  for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree.leaves(gr)):
    atol = rel * max(float(jnp.max(jnp.abs(r))), 1.0)
    np.testing.assert_allclose(a, r, atol=atol, err_msg=jax.tree_util.keystr(path))
  # The reference is not full mode: stopping the context's activations changes the gradient.
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, gr, gb))
  assert diff > 1e-3 * optax.tree.norm(gb)


@pytest.mark.parametrize("name", PRESETS)
def test_one_token_context_gives_the_same_gradient(name):
  cfg, params = setup(name)
  batch = make_batch(cfg, 1, b=3, c=1, general=0, ctx_lens=[1, 1, 1])
  (lf, _), gf = loss_and_grad(cfg, params, batch, "frozen")
  (lb, _), gb = loss_and_grad(cfg, params, batch, "full")
  np.testing.assert_allclose(lf, lb, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), gf, gb)


def test_mixed_batch_weights_groups_by_fraction():
  cfg, params = setup("qwen3-tiny")
  batch = make_batch(cfg, 2, b=4, general=1)
  (loss, m), _ = loss_and_grad(cfg, params, batch, "frozen")
  np.testing.assert_allclose(loss, 0.75 * m["loss/preference"] + 0.25 * m["loss/general"], rtol=1e-6)
  # The general example's rejected response is ignored: changing it changes nothing.
  other = batch.replace(rejected_BxR=batch.rejected_BxR.at[3].set(7))
  (loss2, _), _ = loss_and_grad(cfg, params, other, "frozen")
  assert float(loss2) == float(loss)


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_sft_skips_the_rejected_pass_with_the_same_loss_and_gradient(mode):
  """SFT never reads the rejected responses, so the step skips their pass; the loss and gradient
  equal those from log-probs computed with the rejected pass (a second path), the batch's NLL is
  a token-pooled NLL over what it weights, and the rejected tokens (even garbage) change nothing."""
  cfg, params = setup("qwen3-tiny")
  batch = make_batch(cfg, 4, b=4, general=1)
  (loss, m), grads = loss_and_grad(cfg, params, batch, mode, objective="sft")

  def reference(p):
    chosen, rejected = step_lib.response_logprobs(p, batch, cfg, mode, with_rejected=True)
    lp = {"chosen": chosen, "rejected": rejected}
    return step_lib.loss_from_logprobs(lp, batch.is_preference_B, objective="sft")[0]

  want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)
  assert float(m["tokens"]) == float(jnp.sum(batch.chosen_mask_BxR))
  pref = np.asarray(batch.is_preference_B, bool)
  c, _ = step_lib.response_logprobs(params, batch, cfg, "full")
  nll = lambda rows: -np.sum(np.asarray(c.sum_B)[rows]) / np.sum(np.asarray(c.count_B)[rows])
  np.testing.assert_allclose(loss, pref.mean() * nll(pref) + (~pref).mean() * nll(~pref), rtol=1e-5)
  garbage = batch.replace(rejected_BxR=jnp.full_like(batch.rejected_BxR, 10 ** 6))
  (loss2, _), _ = loss_and_grad(cfg, params, garbage, mode, objective="sft")
  assert float(loss2) == float(loss)


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_dropout_step_uses_a_per_step_key_and_is_off_at_zero(mode):
  cfg, params = setup("qwen3-tiny")
  batch = make_batch(cfg, 5, b=4, general=1)
  opt = optax.sgd(1e-2)
  state = step_lib.init_train_state(params, opt, seed=3)
  plain = step_lib.make_train_step(cfg, "orpo", opt, mode, donate=False)
  drop = step_lib.make_train_step(cfg, "orpo", opt, mode, donate=False, dropout=0.25)
  _, m0 = plain(state, batch)
  _, m1 = drop(state, batch)
  _, m1b = drop(state, batch)
  _, m2 = drop(state.replace(step=state.step + 1), batch)
  assert float(m1["loss"]) == float(m1b["loss"])  # reproducible: the key is fold_in(rng, step)
  assert len({float(m0["loss"]), float(m1["loss"]), float(m2["loss"])}) == 3
  key = jax.random.fold_in(state.rng, state.step)  # a second path: batch_loss with that key
  want, _ = step_lib.batch_loss(params, batch, config=cfg, objective="orpo", gradient_mode=mode,
                                dropout=(0.25, key))
  np.testing.assert_allclose(m1["loss"], want, rtol=1e-5)
  acc = step_lib.make_train_step(cfg, "orpo", opt, mode, donate=False, dropout=0.25, grad_accum=2)
  _, ma = acc(state, batch)
  assert np.isfinite(float(ma["loss"])) and float(ma["loss"]) != float(m1["loss"])
  with pytest.raises(ValueError, match="dropout"):
    step_lib.make_train_step(cfg, "orpo", opt, mode, dropout=1.0)


@pytest.mark.parametrize("objective", ["sft", "dpo", "dpop"])
def test_other_objectives_plug_in(objective):
  cfg, params = setup("qwen3-tiny" if objective != "dpo" else "qwen3_5-tiny")
  batch = make_batch(cfg, 3, b=3, general=1)
  opt = optim.apollo(1e-2, rank=2)
  step = step_lib.make_train_step(cfg, objective, opt, "frozen", donate=False)
  state = step_lib.init_train_state(params, opt)
  ref = params if objective != "sft" else None
  new_state, m = step(state, batch, ref)
  assert np.isfinite(float(m["loss"])) and int(new_state.step) == 1
  if objective in ("dpo", "dpop"):  # policy == reference: rewards start at exactly 0
    assert abs(float(m["rewards/margins"])) < 1e-6


def _train(cfg, params, batches, mesh, opt):
  step = step_lib.make_train_step(cfg, "orpo", opt, "frozen", mesh=mesh, donate=False)
  state = step_lib.init_train_state(params, opt)
  losses = []
  for b in batches:
    state, m = step(state, b)
    losses.append(float(m["loss"]))
  return state, losses


def _sharding_case(name, steps):
  # The hybrid family's backward pass differs by ~1e-4 (relative) between reduction orders; Adam's
  # per-element normalisation turns that into O(lr) differences on near-zero gradient entries, so
  # that family is compared with SGD (the sharding, not the optimizer, is under test here).
  opt = (optim.apollo(1e-3, rank=2, update_proj_gap=2, weight_decay=0.01) if name.startswith("qwen3-")
         else optax.sgd(1e-2))
  cfg, params = setup(name)
  batches = [make_batch(cfg, 10 + i, b=8, general=2) for i in range(steps)]
  return cfg, params, batches, opt


@functools.lru_cache(maxsize=None)
def _one_device_reference(name, steps):
  cfg, params, batches, opt = _sharding_case(name, steps)
  return _train(cfg, params, batches, None, opt)


# (8, 1), pure data parallelism, is the data axis of (2, 4) alone; left out to keep the suite short.
@pytest.mark.parametrize("name,shape,steps", [("qwen3-tiny", (2, 4), 3), ("qwen3-tiny", (1, 8), 3),
                                              (LONG, (2, 4), 2)])
def test_sharded_step_matches_one_device(name, shape, steps):
  assert jax.device_count() == 8, "tests run on 8 fake CPU devices (tests/conftest.py)"
  cfg, params, batches, opt = _sharding_case(name, steps)
  ref_state, ref_losses = _one_device_reference(name, steps)
  mesh = mesh_lib.make_mesh(shape)
  state, losses = _train(cfg, params, batches, mesh, opt)
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state.params, ref_state.params)
  if shape[1] > 1:  # parameters really are sharded over fsdp
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    assert any("fsdp" in s for s in specs)


def test_partition_table():
  assert mesh_lib.leaf_spec("['embed']", (264, 48), 4) == jax.sharding.PartitionSpec(None, "fsdp")  # D: a lookup stays local
  assert mesh_lib.leaf_spec("['lm_head']", (48, 264), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  # Stacked layer leaves (L, in, out) read like their layer's (in, out); the layer axis stays whole.
  o_proj = "['layers']['full_attention']['attn']['o_proj']"
  assert mesh_lib.leaf_spec(o_proj, (8, 64, 48), 4) == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert mesh_lib.leaf_spec(o_proj, (8, 63, 48), 4) == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert mesh_lib.leaf_spec("['layers']['linear_attention']['x']", (8, 5, 7), 4) == jax.sharding.PartitionSpec()
  assert mesh_lib.leaf_spec("['layers']['full_attention']['input_norm']", (8, 48), 4) == jax.sharding.PartitionSpec()
  assert mesh_lib.leaf_spec("['x']", (7, 13), 4) == jax.sharding.PartitionSpec()  # nothing divisible
  assert mesh_lib.leaf_spec("['final_norm']", (48,), 4) == jax.sharding.PartitionSpec()
  assert mesh_lib.parse_mesh_flag("2,4") == (2, 4)
  with pytest.raises(ValueError, match="--mesh: expected"):
    mesh_lib.parse_mesh_flag("8")


@pytest.mark.parametrize("name,mode", [("qwen3-tiny", "frozen"), ("qwen3-tiny", "full"), ("qwen3_5-tiny", "frozen")])
def test_grad_accumulation_equals_large_batch(name, mode):
  cfg, params = setup(name)
  batch = make_batch(cfg, 21, b=6, general=2)
  kw = dict(config=cfg, objective="orpo", gradient_mode=mode)
  (l1, m1), g1 = jax.jit(jax.value_and_grad(functools.partial(step_lib.batch_loss, **kw), has_aux=True))(params, batch)
  (l3, m3), g3 = jax.jit(lambda p, b: step_lib.accumulated_value_and_grad(p, b, 3, **kw))(params, batch)
  np.testing.assert_allclose(l3, l1, atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m3[k], m1[k], atol=1e-5, err_msg=k)
  # The hybrid family's float32 backward pass changes by up to ~5e-4 (relative) with the batch
  # shape alone (a per-example gradient differs between batch sizes 6 and 2; the forward agrees to
  # 1e-7): compare it at that level, the dense family at 1e-5.
  tol = 1e-5 if name == "qwen3-tiny" else 2e-3
  for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g1)):
    assert float(jnp.max(jnp.abs(a - b))) <= tol * max(1.0, float(jnp.max(jnp.abs(b))))
  # A naive mean of micro-batch losses would differ (token-pooled NLL, per-group fractions).
  micro_loss = jax.jit(lambda p, b: step_lib.batch_loss(p, b, **kw)[0])
  naive = np.mean([float(micro_loss(params, jax.tree.map(lambda x: x[i * 2:(i + 1) * 2], batch))) for i in range(3)])
  assert abs(naive - float(l1)) > 1e-4


def test_remat_and_bf16_options():
  cfg, params = setup("qwen3_5-tiny")
  batch = make_batch(cfg, 30, b=3, general=1)
  kw = dict(config=cfg, objective="orpo", gradient_mode="frozen")
  vg = lambda **extra: jax.jit(jax.value_and_grad(functools.partial(step_lib.batch_loss, **kw, **extra),
                                                  has_aux=True))(params, batch)
  (l0, _), g0 = vg()
  for remat in (True, "dots"):
    (l1, _), g1 = vg(remat=remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)
  (l2, _), g2 = vg(compute_dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g2))  # float32 master weights
  assert abs(float(l2) - float(l0)) < 0.05 * abs(float(l0))
