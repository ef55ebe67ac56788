"""A one-minute demo of the foundation: ORPO on a toy preference task with APOLLO vs AdamW.

The "policy" is a log-linear next-token model over a 31-token vocabulary whose features are the
context cue and the previous token. Each preference pair asks for the cue's *preferred*
continuation over its *default* one. The demo trains the same policy with APOLLO, APOLLO-Mini and
AdamW and reports the ORPO metrics and the optimizer-state size. The real launcher (absl flags,
Orbax, TensorBoard) replaces this once the model and train step exist.
"""

from __future__ import annotations

import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamjax import objectives, optim

VOCAB, N_CUES, RESP_LEN, D = 31, 7, 5, 16


def make_pairs(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
  """Returns a batch of (cue, chosen, rejected) token arrays; responses are cue-dependent chains."""
  cue = rng.integers(0, N_CUES, size=batch)
  start = 1 + (cue * 3) % (VOCAB - 1)
  steps = np.arange(RESP_LEN)
  chosen = 1 + (start[:, None] + 2 * steps) % (VOCAB - 1)
  rejected = 1 + (start[:, None] + 5 * steps + 1) % (VOCAB - 1)
  return {"cue": cue, "chosen": chosen, "rejected": rejected}


def init_policy(key: jax.Array) -> dict[str, jax.Array]:
  """Returns the toy policy's params: cue and token embeddings, one hidden matrix, a head."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {
      "cue_embed": jax.random.normal(k1, (N_CUES, D)) * 0.3,
      "token_embed": jax.random.normal(k2, (VOCAB, D)) * 0.3,
      "hidden": jax.random.normal(k3, (D, 3 * D)) / np.sqrt(D),
      "lm_head": jax.random.normal(k4, (3 * D, VOCAB)) / np.sqrt(3 * D),
  }


def response_logits(params, cue_B, response_BxR):
  """Returns logits_BxRxV for each response token given the cue and the previous token."""
  prev_BxR = jnp.concatenate([jnp.zeros_like(response_BxR[:, :1]), response_BxR[:, :-1]], axis=1)
  h = params["cue_embed"][cue_B][:, None, :] + params["token_embed"][prev_BxR]
  return jax.nn.gelu(h @ params["hidden"]) @ params["lm_head"]


def loss_fn(params, batch):
  mask = jnp.ones_like(batch["chosen"], jnp.float32)
  lp = lambda resp: objectives.sequence_logprobs(response_logits(params, batch["cue"], resp), resp, mask)
  return objectives.orpo(lp(batch["chosen"]), lp(batch["rejected"]), beta=0.1)


def train(opt: optax.GradientTransformation, steps: int, seed: int) -> Iterator[dict]:
  """Yields ORPO metrics every 25 steps while training the toy policy with `opt`."""
  params = init_policy(jax.random.PRNGKey(seed))
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, dict(metrics, loss=loss)

  rng = np.random.default_rng(seed)
  for i in range(steps):
    params, state, metrics = step(params, state, make_pairs(rng, 32))
    if (i + 1) % 25 == 0 or i == 0:
      yield dict(step=i + 1, **{k: float(v) for k, v in metrics.items()})


def state_numbers(opt, params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(jax.eval_shape(opt.init, params)) if x.dtype != jnp.uint32))


def run(steps: int = 200, lr: float = 1e-2, seed: int = 0) -> dict[str, dict]:
  """Trains the toy policy with each optimizer and prints a summary; returns the final metrics."""
  opts = {
      "apollo": optim.apollo(lr, rank=4, update_proj_gap=50),
      "apollo_mini": optim.apollo_mini(lr / 4, update_proj_gap=50),
      "adamw": optax.adamw(lr),
  }
  # The toy's 2-D hidden matrix is projected; embeddings and head stay in AdamW, as in an LLM.
  params = init_policy(jax.random.PRNGKey(seed))
  final = {}
  for name, opt in opts.items():
    t0 = time.perf_counter()
    for m in train(opt, steps, seed):
      print(f"[{name:11s}] step {m['step']:4d}  loss {m['loss']:.4f}  nll {m['nll_loss']:.4f}  "
            f"acc {m['rewards/accuracies']:.2f}  margin {m['rewards/margins']:.4f}  "
            f"log_odds {m['log_odds_chosen']:.3f}")
    m["seconds"] = time.perf_counter() - t0
    m["optimizer_state_numbers"] = state_numbers(opt, params)
    final[name] = m
  print("\nsummary (final step):")
  for name, m in final.items():
    print(f"  {name:11s} loss {m['loss']:.4f}  acc {m['rewards/accuracies']:.2f}  "
          f"state numbers {m['optimizer_state_numbers']:6d}  time {m['seconds']:.1f}s")
  return final
