"""Sampling: jitted prefill + a decode loop over the cache (temperature, top-p, greedy, stops)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.model.config import ModelConfig
from dreamjax.model.decoder import forward, positions_from_mask, prefill


class Generation(NamedTuple):
  """Sampled continuations (right-padded with pad_id after a stop token)."""

  tokens_BxN: jax.Array  # int32 generated tokens, N = max_new_tokens
  lengths_B: jax.Array  # int32 tokens generated per row, including the stop token
  logprobs_BxN: jax.Array  # float32 log p(token) under the model (temperature 1), 0 past the end


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None, multiple: int = 1):
  """Returns (tokens_BxP, mask_BxP) with prompts left-padded to a common length.

  The length is `length`, or the longest prompt rounded up to a multiple of `multiple` (so prompt
  batches of similar length share one compiled generate).
  """
  length = length or -(-max(len(p) for p in prompts) // multiple) * multiple
  toks = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= length:
      raise ValueError(f"prompt {i} has {len(p)} tokens; expected 1..{length}")
    toks[i, length - len(p):] = p
    mask[i, length - len(p):] = 1
  return jnp.asarray(toks), jnp.asarray(mask)


def sample_token(key, logits_BxV, temperature_B, top_p_B):
  """Returns sampled tokens: greedy where temperature == 0, else nucleus sampling at temperature."""
  logits = logits_BxV.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature_B, 1e-6)[:, None]
  probs = jax.nn.softmax(scaled, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
  keep_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < top_p_B[:, None]
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  sampled = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)
  return jnp.where(temperature_B > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "pad_id"))
def _generate(params, tokens_BxP, mask_BxP, temperature_B, top_p_B, stop_tokens, key, *, config,
              max_new_tokens, pad_id):
  b, p = tokens_BxP.shape
  positions = positions_from_mask(mask_BxP)
  # The prompt but its last token fills the cache (in chunks, no LM head); the last token's pass
  # gives the first logits. Prompts are left-padded, so every row's last token is real.
  cache = prefill(params, tokens_BxP[:, :-1], positions[:, :-1], mask_BxP[:, :-1], config=config,
                  capacity=p + max_new_tokens)
  first = forward(params, tokens_BxP[:, -1:], positions[:, -1:], mask_BxP[:, -1:], cache, config=config)
  logits, cache = first.logits, first.cache
  next_pos = positions[:, -1] + 1
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  lps = jnp.zeros((b, max_new_tokens), jnp.float32)

  def cond(carry):
    i, _, _, done, *_ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last_logits, cache, done, out, lps, lengths = carry
    tok = sample_token(jax.random.fold_in(key, i), last_logits, temperature_B, top_p_B)
    lp = jnp.take_along_axis(jax.nn.log_softmax(last_logits.astype(jnp.float32)), tok[:, None], axis=-1)[:, 0]
    live = ~done
    out = out.at[:, i].set(jnp.where(live, tok, pad_id))
    lps = lps.at[:, i].set(jnp.where(live, lp, 0.0))
    lengths = lengths + live.astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == stop_tokens[None, :], axis=-1)
    step = forward(params, tok[:, None], (next_pos + i)[:, None], live[:, None].astype(jnp.int32), cache,
                   config=config)
    return i + 1, step.logits[:, 0], step.cache, done, out, lps, lengths

  init = (jnp.int32(0), logits[:, -1], cache, jnp.zeros((b,), bool), out, lps, jnp.zeros((b,), jnp.int32))
  _, _, _, _, out, lps, lengths = jax.lax.while_loop(cond, body, init)
  return Generation(out, lengths, lps)


def generate(
    params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]] | tuple[jax.Array, jax.Array],
    max_new_tokens: int,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    key: Optional[jax.Array] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    pad_id: Optional[int] = None,
    pad_multiple: int = 16,
) -> Generation:
  """Returns sampled continuations of a batch of prompts, reproducible from `key`.

  Args:
    prompts: token-id lists (left-padded here) or an already left-padded (tokens_BxP, mask_BxP).
    temperature, top_p: scalars or one value per prompt (a temperature sweep in one batch);
      temperature 0 is greedy.
    stop_tokens: default: the config's eos tokens. A row stops after emitting one.
    pad_multiple: token-id lists are left-padded to a multiple of this (pads are invisible to the
      model), so similar prompt lengths reuse one compilation.
  """
  pad_id = config.pad_token_id if pad_id is None else pad_id
  pad_id = 0 if pad_id is None else pad_id
  if isinstance(prompts, tuple) and len(prompts) == 2 and hasattr(prompts[0], "shape"):
    tokens, mask = prompts
  else:
    tokens, mask = left_pad(prompts, pad_id, multiple=pad_multiple)
  b = tokens.shape[0]
  temp = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
  topp = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
  stops = tuple(config.eos_token_ids if stop_tokens is None else stop_tokens) or (-1,)
  key = jax.random.PRNGKey(0) if key is None else key
  return _generate(params, tokens, mask, temp, topp, jnp.asarray(stops, jnp.int32), key, config=config,
                   max_new_tokens=max_new_tokens, pad_id=pad_id)
