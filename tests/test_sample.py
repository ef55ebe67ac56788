"""generate(): greedy vs repeated full forwards, reproducibility, stops, nucleus sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import model as M
from dreamjax.model import sample


@functools.lru_cache(maxsize=None)
def setup(name):
  cfg = M.ModelConfig.preset(name)
  params = M.init_params(cfg, jax.random.PRNGKey(3), std=0.3)  # peaked logits: varied argmaxes
  return cfg, params


PROMPTS = [[5, 9, 11, 40, 7], [17, 3], [100, 101, 102, 103, 104, 105, 106, 107]]
N = 6  # one max_new_tokens for every test: generate() compiles once per model


@functools.lru_cache(maxsize=None)
def fwd(cfg):
  return jax.jit(functools.partial(M.forward, config=cfg))


def greedy_by_full_forward(cfg, params, prompt, n, width=16):
  """The independent path: no cache, the whole sequence recomputed for every new token.

  The sequence sits at the start of a fixed-width buffer (right pads are invisible to earlier
  tokens), so all lengths share one compiled forward.
  """
  seq = list(prompt)
  for _ in range(n):
    toks = jnp.zeros((1, width), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
    mask = (jnp.arange(width) < len(seq)).astype(jnp.int32)[None]
    logits = fwd(cfg)(params, toks, M.positions_from_mask(mask), mask).logits
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3_5-tiny"])
def test_greedy_matches_recomputing_full_sequence(name):
  cfg, params = setup(name)
  n = N
  gen = sample.generate(params, cfg, PROMPTS, n, temperature=0.0, stop_tokens=[-1])
  for i, p in enumerate(PROMPTS):
    assert gen.tokens_BxN[i].tolist() == greedy_by_full_forward(cfg, params, p, n)
  assert gen.lengths_B.tolist() == [n] * len(PROMPTS)
  assert len({tuple(r) for r in gen.tokens_BxN.tolist()}) > 1


def test_reproducible_from_key_and_stop_tokens():
  cfg, params = setup("qwen3-tiny")
  a = sample.generate(params, cfg, PROMPTS, N, temperature=1.0, key=jax.random.PRNGKey(5), stop_tokens=[-1])
  b = sample.generate(params, cfg, PROMPTS, N, temperature=1.0, key=jax.random.PRNGKey(5), stop_tokens=[-1])
  c = sample.generate(params, cfg, PROMPTS, N, temperature=1.0, key=jax.random.PRNGKey(6), stop_tokens=[-1])
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)
  # Stop at the greedy path's third token: that row ends there and is padded after.
  g = sample.generate(params, cfg, PROMPTS, N, stop_tokens=[-1])
  stop = int(g.tokens_BxN[0, 2])
  s = sample.generate(params, cfg, PROMPTS, N, stop_tokens=[stop], pad_id=0)
  first = [list(r).index(stop) + 1 if stop in list(r) else N for r in g.tokens_BxN.tolist()]
  assert s.lengths_B.tolist() == first
  for i, n in enumerate(first):
    np.testing.assert_array_equal(s.tokens_BxN[i, :n], g.tokens_BxN[i, :n])
    assert np.all(np.asarray(s.tokens_BxN[i, n:]) == 0) and np.all(np.asarray(s.logprobs_BxN[i, n:]) == 0)


def test_logprobs_are_model_logprobs():
  cfg, params = setup("qwen3_5-tiny")
  gen = sample.generate(params, cfg, PROMPTS, N, temperature=0.8, key=jax.random.PRNGKey(1), stop_tokens=[-1])
  width = 16
  for i, prompt in enumerate(PROMPTS):
    seq = prompt + gen.tokens_BxN[i].tolist()
    toks = jnp.zeros((1, width), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
    mask = (jnp.arange(width) < len(seq)).astype(jnp.int32)[None]
    logits = fwd(cfg)(params, toks, M.positions_from_mask(mask), mask).logits
    lp = jax.nn.log_softmax(logits[0, len(prompt) - 1 : len(seq) - 1])
    want = jnp.take_along_axis(lp, gen.tokens_BxN[i][:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(gen.logprobs_BxN[i], want, atol=1e-4)


def test_sample_token_distribution_with_temperature_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  n = 20000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  draw = jax.jit(jax.vmap(lambda k, t, p: sample.sample_token(k, logits, t, p)[0], in_axes=(0, None, None)))
  freq = lambda t, p: np.bincount(np.asarray(draw(keys, jnp.array([t]), jnp.array([p]))), minlength=4) / n
  np.testing.assert_allclose(freq(1.0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
  hot = np.array([0.5, 0.3, 0.15, 0.05]) ** 0.5
  np.testing.assert_allclose(freq(2.0, 1.0), hot / hot.sum(), atol=0.015)
  # top_p = 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), renormalised.
  np.testing.assert_allclose(freq(1.0, 0.7), [0.625, 0.375, 0, 0], atol=0.015)
  assert freq(0.0, 1.0)[0] == 1.0  # greedy
