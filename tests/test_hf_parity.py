"""Parity with Hugging Face transformers on golden fixtures (no torch needed here).

The fixtures (config.json, model.safetensors, golden.npz with transformers' logits) are written by
tests/make_fixtures.py with transformers + torch; tests/fixtures/README.md says how to regenerate.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import model as M
from dreamjax.model import hf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ["qwen3_tiny", "qwen3_tied", "qwen3_5_tiny"]


@functools.lru_cache(maxsize=None)
def load(name, scan_layers=True):
  folder = os.path.join(FIXTURES, name)
  if not os.path.isfile(os.path.join(folder, "golden.npz")):
    pytest.skip(f"fixture {folder} not generated yet (run tests/make_fixtures.py with transformers)")
  cfg, params = hf.load(folder)
  cfg = cfg.replace(scan_layers=scan_layers)
  golden = dict(np.load(os.path.join(folder, "golden.npz")))
  fwd = jax.jit(functools.partial(M.forward, config=cfg, return_hidden=True))
  return cfg, params, golden, fwd


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, scan):
  cfg, params, golden, fwd = load(name, scan)
  ids = jnp.asarray(golden["input_ids"])
  mask = jnp.asarray(golden["attention_mask"])
  out = fwd(params, ids, jnp.asarray(golden["position_ids"]), mask)
  logits, hidden = out.logits, out.hidden
  # Per layer first, so a mismatch names the layer where it starts.
  for i in range(cfg.num_layers):
    np.testing.assert_allclose(hidden[i][0], golden["hidden_states_row0"][i], atol=1e-4, rtol=1e-5,
                               err_msg=f"{name}: residual stream entering layer {i}")
  np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=1e-5)
  if not scan:  # the layer scan and the Python loop over the same blocks: one computation
    scanned = load(name, True)[3](params, ids, jnp.asarray(golden["position_ids"]), mask)
    np.testing.assert_allclose(logits, scanned.logits, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_logits_match_transformers(name):
  cfg, params, golden, fwd = load(name)
  mask = jnp.asarray(golden["attention_mask_pad"])
  assert not np.all(golden["attention_mask_pad"])  # the fixture does pad
  pos = M.positions_from_mask(mask)
  np.testing.assert_array_equal(pos, golden["position_ids_pad"])
  logits = fwd(params, jnp.asarray(golden["input_ids_pad"]), pos, mask).logits
  real = golden["attention_mask_pad"].astype(bool)  # logits at pads are meaningless in HF too
  np.testing.assert_allclose(np.asarray(logits)[real], golden["logits_pad"][real], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 16], ids=["one-shot", "chunks-of-16"])
def test_prefill_then_token_by_token_decode_matches_transformers(chunk):
  """The cached path (a prefill, in chunks or at once, then the recurrent form one token at a
  time) vs HF logits. 69 context tokens in chunks of 16 start with 11 pads of left padding."""
  cfg, params, golden, _ = load("qwen3_5_tiny")
  cfg = cfg.replace(prefill_chunk=chunk)
  ids, pos = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["position_ids"])
  b, t = ids.shape
  ctx = 70
  cache = jax.jit(functools.partial(M.prefill, config=cfg, capacity=t))(
      params, ids[:, : ctx - 1], pos[:, : ctx - 1], jnp.ones((b, ctx - 1), jnp.int32))
  assert cache.capacity == t + (11 if chunk else 0)
  step = jax.jit(functools.partial(M.forward, config=cfg))
  got = []
  for i in range(ctx - 1, t):
    out = step(params, ids[:, i : i + 1], pos[:, i : i + 1], jnp.ones((b, 1), jnp.int32), cache)
    got.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), golden["logits"][:, ctx - 1:], atol=1e-4, rtol=1e-5)


def test_fixture_configs_exercise_every_feature():
  cfgs = {n: load(n)[0] for n in NAMES}
  assert any(c.tie_embeddings for c in cfgs.values()) and any(not c.tie_embeddings for c in cfgs.values())
  assert "lm_head" not in load("qwen3_tied")[1] and "lm_head" in load("qwen3_tiny")[1]
  h = cfgs["qwen3_5_tiny"]
  assert set(h.layer_types) == {M.FULL, M.LINEAR} and h.rotary_dim < h.head_dim
  assert h.num_kv_heads < h.num_heads and h.linear_num_value_heads > h.linear_num_key_heads
  assert h.linear_key_head_dim != h.linear_value_head_dim
  assert load("qwen3_5_tiny")[2]["input_ids"].shape[1] > 64  # longer than one DeltaNet chunk in transformers


def test_tokenizer_matches_transformers():
  folder = os.path.join(FIXTURES, "qwen3_tiny")
  path = os.path.join(folder, "tokenizer_golden.json")
  if not os.path.isfile(path):
    pytest.skip(f"{path} not generated yet")
  want = json.load(open(path))
  tok = hf.load_tokenizer(folder)
  assert tok.get_vocab_size() == want["vocab_size"]
  for name, i in want["special_tokens"].items():
    assert tok.token_to_id(name) == i
  for case in want["encode"]:
    assert tok.encode(case["text"], add_special_tokens=False).ids == case["ids"], case["text"]
  assert tok.encode(want["chat_rendered"], add_special_tokens=False).ids == want["chat_rendered_ids"]
