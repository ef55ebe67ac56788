"""Batches for the preference step: left-padded contexts, right-padded responses.

Contexts are *left*-padded to C so every context ends at the same slot (the frozen-context cache
is then continued by all responses from one place); chosen and rejected responses are
*right*-padded to R. General (replay) examples ride in the same batch with
`is_preference_B = 0`: their text is split into a one-token context and a response, the rejected
response is empty, and the step gives them the SFT loss — one batch, a per-example loss.

Label alignment (used by both gradient modes): the response pass reads
[last context token, response[:-1]] and predicts response[0:R].
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class PreferenceBatch:
  """A padded batch of B examples (preference and/or general)."""

  context_BxC: jnp.ndarray  # int32 tokens, left-padded
  context_mask_BxC: jnp.ndarray  # int32, 1 = real token
  chosen_BxR: jnp.ndarray  # int32 tokens of the preferred response, right-padded
  chosen_mask_BxR: jnp.ndarray  # int32
  rejected_BxR: jnp.ndarray  # int32 tokens of the rejected response (all-pad for general examples)
  rejected_mask_BxR: jnp.ndarray  # int32
  is_preference_B: jnp.ndarray  # float32: 1 = preference example, 0 = general (SFT) example

  @property
  def batch_size(self) -> int:
    return self.context_BxC.shape[0]


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """Token ids of one example; `rejected` is None for a general (SFT) example."""

  context: Sequence[int]
  chosen: Sequence[int]
  rejected: Optional[Sequence[int]] = None


@dataclasses.dataclass
class TruncationStats:
  """Counts of examples whose context or response was cut to fit."""

  context_truncated: int = 0
  response_truncated: int = 0


def general_example(tokens: Sequence[int]) -> TokenizedExample:
  """Returns an SFT example: the first token is the context, the rest the response."""
  if len(tokens) < 2:
    raise ValueError(f"a general example needs at least 2 tokens, got {len(tokens)}")
  return TokenizedExample(context=tokens[:1], chosen=tokens[1:], rejected=None)


def collate(
    examples: Sequence[TokenizedExample],
    context_len: int,
    response_len: int,
    pad_id: int = 0,
    stats: Optional[TruncationStats] = None,
) -> PreferenceBatch:
  """Returns a PreferenceBatch with static shapes (B, context_len) and (B, response_len).

  Over-long contexts keep their *last* context_len tokens (the decision is made at the end);
  over-long responses keep their first response_len tokens. Both are counted in `stats`.
  """
  if context_len < 1 or response_len < 1:
    raise ValueError(f"context_len and response_len must be >= 1, got {context_len}, {response_len}")
  b = len(examples)
  ctx = np.full((b, context_len), pad_id, np.int32)
  ctx_m = np.zeros((b, context_len), np.int32)
  resp = {k: np.full((b, response_len), pad_id, np.int32) for k in ("chosen", "rejected")}
  resp_m = {k: np.zeros((b, response_len), np.int32) for k in ("chosen", "rejected")}
  is_pref = np.zeros((b,), np.float32)
  for i, ex in enumerate(examples):
    if len(ex.context) == 0:
      raise ValueError(f"example {i}: empty context; the first response token needs a context token")
    c = list(ex.context)[-context_len:]
    if stats is not None and len(ex.context) > context_len:
      stats.context_truncated += 1
    ctx[i, context_len - len(c) :] = c
    ctx_m[i, context_len - len(c) :] = 1
    for key, toks in (("chosen", ex.chosen), ("rejected", ex.rejected)):
      if toks is None:
        continue
      if len(toks) == 0:
        raise ValueError(f"example {i}: empty {key} response")
      r = list(toks)[:response_len]
      if stats is not None and len(toks) > response_len:
        stats.response_truncated += 1
      resp[key][i, : len(r)] = r
      resp_m[key][i, : len(r)] = 1
    is_pref[i] = 1.0 if ex.rejected is not None else 0.0
  return PreferenceBatch(
      context_BxC=jnp.asarray(ctx),
      context_mask_BxC=jnp.asarray(ctx_m),
      chosen_BxR=jnp.asarray(resp["chosen"]),
      chosen_mask_BxR=jnp.asarray(resp_m["chosen"]),
      rejected_BxR=jnp.asarray(resp["rejected"]),
      rejected_mask_BxR=jnp.asarray(resp_m["rejected"]),
      is_preference_B=jnp.asarray(is_pref),
  )
