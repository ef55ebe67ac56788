"""Tests of the simulations' shared fine-tuning program (sims/engine.py) against the project's train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax.train.step import init_train_state, make_train_step
from sims import engine
from sims import world as W

CONFIG = W.model_config("qwen3")
SEEDS, BATCH, STEPS = 2, 7, 3  # an odd batch: rows and steps cannot be confused
POOL = W.collate(W.examples("behaviour", 61, np.random.default_rng(0), W.World.make(0), preference=True))
KEYS = jax.random.split(jax.random.PRNGKey(3), SEEDS)


@pytest.fixture(scope="module")
def params_S():
  return jax.vmap(lambda k: W.init_params(CONFIG, k))(KEYS)


def _reference(params_S, ref_S, idx_SxTxB, optimizer, objective, gradient_mode, nll_on_prompt, lr=1e-3):
  """Returns (params [S], loss [S, T]): a loop of `make_train_step` per seed."""
  step = make_train_step(CONFIG, objective, engine.OPTIMIZERS[optimizer](lr), gradient_mode, donate=False,
                         nll_on_prompt=nll_on_prompt)
  out, losses = [], []
  for s in range(SEEDS):
    start, ref = (jax.tree.map(lambda x, s=s: x[s], t) for t in (params_S, ref_S))
    state = init_train_state(start, engine.OPTIMIZERS[optimizer](lr))
    loss = []
    for t in range(idx_SxTxB.shape[1]):
      batch = jax.tree.map(lambda x, s=s, t=t: x[idx_SxTxB[s, t]], POOL)
      state, m = step(state, batch, ref) if objective in ("dpo", "dpop") else step(state, batch)
      loss.append(float(m["loss"]))
    out.append(state.params)
    losses.append(loss)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *out), np.asarray(losses)


@pytest.mark.parametrize("optimizer,objective,gradient_mode,nll_on_prompt", [
    ("apollo", "orpo", "full", True), ("adamw", "dpo", "full", False), ("sgd", "sft", "full", False),
    ("apollo_mini", "dpop", "full", False), ("apollo", "orpo", "frozen", False)])
def test_engine_matches_the_project_train_step(params_S, optimizer, objective, gradient_mode, nll_on_prompt):
  """Every optimizer, objective and gradient mode through the one program equals `make_train_step` (round-off).

  DPOP's reference is another model: started at its reference, DPOP's penalty max(0, log π_ref − log π)
  sits at its kink, where float32 round-off decides whether it is on (a 50x larger gradient term).
  """
  idx = engine.sample_indices(KEYS, POOL.batch_size, BATCH)
  ref_S = jax.vmap(lambda k: W.init_params(CONFIG, jax.random.fold_in(k, 1)))(KEYS) if objective == "dpop" else params_S
  settings = engine.arm(STEPS, 1e-3, optimizer=optimizer, objective=objective, nll_on_prompt=nll_on_prompt)
  res = engine.finetune(CONFIG, params_S, POOL, idx, settings, gradient_mode=gradient_mode, ref_S=ref_S)
  want, want_loss = _reference(params_S, ref_S, idx[:, :STEPS], optimizer, objective, gradient_mode, nll_on_prompt)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), res.params, want)
  np.testing.assert_allclose(res.loss[:, :STEPS], want_loss, rtol=1e-5, atol=1e-6)
  assert np.all(res.loss[:, STEPS:] == 0) and np.all(res.rel_update()[:, :STEPS] > 0)


def test_arms_share_one_compile_and_calls_continue_exactly(params_S):
  """Steps, lr, warm-up, optimizer, objective and the index table are traced: one compiled program; a run
  split over two calls (the state carried) equals one call bitwise."""
  fn = engine._run_fn(CONFIG, "full", BATCH, 0.0)
  idx = engine.sample_indices(KEYS, POOL.batch_size, BATCH, start=5)
  whole = engine.finetune(CONFIG, params_S, POOL, idx, engine.arm(STEPS, 2e-3, warmup=2.0))
  first = engine.finetune(CONFIG, params_S, POOL, idx, engine.arm(1, 2e-3, warmup=2.0))
  rest = engine.run(CONFIG, first.state, POOL, idx[:, 1:], engine.arm(STEPS - 1, 2e-3, warmup=2.0))
  jax.tree.map(np.testing.assert_array_equal, rest.params, whole.params)
  np.testing.assert_array_equal(np.concatenate([first.loss[:, :1], rest.loss[:, :STEPS - 1]], 1),
                                whole.loss[:, :STEPS])
  np.testing.assert_array_equal(rest.grad_cos[:, 0], whole.grad_cos[:, 1])  # the previous gradient is carried
  engine.finetune(CONFIG, params_S, POOL, idx[:, ::-1], engine.arm(5, 1e-4, optimizer="sgd", objective="sft"))
  assert fn._cache_size() == 1
  # The warm-up: step 0 at lr / 2 moves the weights less than the constant lr's step 0.
  constant = engine.finetune(CONFIG, params_S, POOL, idx, engine.arm(1, 2e-3))
  assert np.all(first.update_norm[:, 0] < constant.update_norm[:, 0])


def test_sample_indices_are_world_sample_batch_draws():
  idx = engine.sample_indices(KEYS, 61, BATCH, start=4)
  for s in range(SEEDS):
    for t in (0, 9):
      want = W.sample_batch(POOL, jax.random.fold_in(KEYS[s], 4 + t), BATCH)
      np.testing.assert_array_equal(POOL.context_BxC[idx[s, t]], want.context_BxC)
  per_seed = engine.sample_indices(KEYS, np.array([3, 61]), BATCH)
  assert per_seed[0].max() < 3 and per_seed[1].max() >= 3
