"""Held-out evaluation: general-text perplexity against the base model, preference log-probs, and
the `Evaluator` that gathers one eval's figures (with `dreamjax.train.diagnostics`' drift and
residual growth) for the logger and the guard:

  perplexity, perplexity/base, perplexity/ratio        held-out general text
  logps/chosen, logps/rejected                         held-out preference pairs, mean per token
  drift/..., residual_growth/...                       see dreamjax.train.diagnostics

In TensorBoard (`tb_sections`) the first two lines are eval/..., the drift and growth monitor/....
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp

from dreamjax import objectives as obj
from dreamjax.model import ModelConfig, forward, lm_head, positions_from_mask
from dreamjax.train import diagnostics
from dreamjax.train import step as step_lib
from dreamjax.train.batch import PreferenceBatch

Figures = diagnostics.Figures


# ---------------------------------------------------------------------------------------------
# Held-out general-data perplexity.


def general_inputs(batch: PreferenceBatch) -> tuple[jax.Array, jax.Array]:
  """Returns (tokens_BxN, mask_BxN): each row's context followed by its chosen response (N = C + R)."""
  tokens = jnp.concatenate([batch.context_BxC, batch.chosen_BxR], axis=1)
  mask = jnp.concatenate([batch.context_mask_BxC, batch.chosen_mask_BxR], axis=1)
  return tokens, mask


def general_nll(params, batch: PreferenceBatch, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Returns (Σ NLL, token count) in float32 of every row's chosen tokens given its context.

    nll = −Σ_b Σ_t mask_bt · log p(chosen_bt | context_b, chosen_b<t)

  Every row counts (a held-out set of general examples: `collate([general_example(...)])`); the
  first token of a general example is its context and is not scored. Sums, not means, so a
  held-out set spread over batches pools its tokens exactly.
  """
  tokens, mask = general_inputs(batch)
  c = batch.context_BxC.shape[1]
  inp, imask = tokens[:, :-1], mask[:, :-1]
  out = forward(params, inp, positions_from_mask(imask), imask, config=config, head=False)
  lp = obj.linear_sequence_logprobs(out.head_input[:, c - 1 :], lm_head(params, config), batch.chosen_BxR,
                                    batch.chosen_mask_BxR)
  return -jnp.sum(lp.sum_B), jnp.sum(lp.count_B)


def general_perplexity(params, batch: PreferenceBatch, config: ModelConfig) -> jax.Array:
  """Returns the token-weighted perplexity exp(Σ NLL / Σ tokens) of the batch (see `general_nll`)."""
  nll, n = general_nll(params, batch, config)
  return jnp.exp(nll / jnp.maximum(n, 1.0))


_general_nll_jit = jax.jit(general_nll, static_argnames=("config",))


def held_out_perplexity(params, batches: Iterable[PreferenceBatch], config: ModelConfig) -> float:
  """Returns exp(Σ_batches NLL / Σ_batches tokens): tokens pooled across batches, not a mean of perplexities."""
  total, count = 0.0, 0.0
  for batch in batches:
    nll, n = _general_nll_jit(params, batch, config=config)
    total, count = total + float(nll), count + float(n)
  if count == 0:
    raise ValueError("held_out_perplexity: the held-out batches hold no scored tokens")
  return math.exp(total / count)


def perplexity_figures(perplexity: float, base_perplexity: float) -> Figures:
  """Returns {'perplexity', 'perplexity/base', 'perplexity/ratio'} (ratio = current / base)."""
  return {"perplexity": perplexity, "perplexity/base": base_perplexity,
          "perplexity/ratio": perplexity / base_perplexity}


# ---------------------------------------------------------------------------------------------
# Held-out preference log-probabilities (fed to the trend tracker).


def preference_logps(params, batch: PreferenceBatch, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (Σ chosen, Σ rejected, n): sums over preference rows of their mean per-token log-probs.

  The response pass is the step's own (frozen context), so the figures match the objectives'
  `logps/*` for ORPO/SFT (per-token means; DPO's training metrics are per-sequence sums).
  """
  chosen, rejected = step_lib.response_logprobs(params, batch, config, "frozen")
  w = batch.is_preference_B.astype(jnp.float32)
  return jnp.sum(chosen.mean_B * w), jnp.sum(rejected.mean_B * w), jnp.sum(w)


_preference_logps_jit = jax.jit(preference_logps, static_argnames=("config",))



# ---------------------------------------------------------------------------------------------
# All figures of one eval.

EVAL_FIGURES = ("perplexity", "logps/", "eval_data/")  # held-out evaluation; the others monitor the weights


def tb_sections(figures: Figures) -> dict[str, Figures]:
  """Returns {'eval': held-out perplexity and log-probs, 'monitor': drift, residual growth, ...}:
  an eval's figures as the logger's TensorBoard sections."""
  out: dict[str, Figures] = {"eval": {}, "monitor": {}}
  for k, v in figures.items():
    out["eval" if k.startswith(EVAL_FIGURES) else "monitor"][k] = v
  return out


class Evaluator:
  """Computes one eval's figures against the base model; the base's own figures are cached.

  Args:
    base_params: the model before training (drift, perplexity and residual growth baselines).
    config: its ModelConfig.
    general_batches: held-out general text (collate of general_example), for perplexity; the
      first also serves residual growth.
    preference_batches: held-out preference pairs for the chosen/rejected trend (optional).
    objective_metrics: optional `(params, batch) -> metrics` of the training objective (the step's
      loss without its gradient); its metrics over the preference batches, averaged by their
      preference examples, are figures 'eval_data/<metric>' (eval_data/loss, .../rewards/accuracies).
  """

  def __init__(self, base_params, config: ModelConfig, general_batches: Sequence[PreferenceBatch],
               preference_batches: Sequence[PreferenceBatch] = (), objective_metrics=None):
    if not general_batches:
      raise ValueError("Evaluator needs at least one held-out general batch")
    self.base_params, self.config = base_params, config
    self.general_batches, self.preference_batches = list(general_batches), list(preference_batches)
    self.objective_metrics = objective_metrics
    self._residual = jax.jit(diagnostics.residual_growth, static_argnames=("config",))
    self._drift = jax.jit(diagnostics.weight_drift, static_argnames=("config",))
    self._base_perplexity = held_out_perplexity(base_params, self.general_batches, config)
    self._base_residual = self._residual_figures(base_params)

  def _residual_figures(self, params) -> Figures:
    tokens, mask = general_inputs(self.general_batches[0])
    return {k: float(v) for k, v in self._residual(params, tokens, mask, config=self.config).items()}

  def figures(self, params) -> Figures:
    """Returns this eval's figures as host floats (perplexity, drift, residual growth, logps)."""
    out = perplexity_figures(held_out_perplexity(params, self.general_batches, self.config), self._base_perplexity)
    out.update({k: float(v) for k, v in self._drift(params, self.base_params, config=self.config).items()})
    res = self._residual_figures(params)
    out.update(res)
    out.update(diagnostics.growth_vs_base(res, self._base_residual))
    if self.preference_batches:
      sc, sr, n = 0.0, 0.0, 0.0
      for batch in self.preference_batches:
        c, r, k = _preference_logps_jit(params, batch, config=self.config)
        sc, sr, n = sc + float(c), sr + float(r), n + float(k)
      if n > 0:
        out["logps/chosen"], out["logps/rejected"] = sc / n, sr / n
    if self.objective_metrics is not None and self.preference_batches:
      out.update(self._objective_figures(params))
    return out

  def _objective_figures(self, params) -> Figures:
    """Returns the objective's metrics over the preference batches, weighted by each batch's count
    of preference examples (the metrics are means over those), as 'eval_data/<metric>'."""
    sums: dict[str, float] = {}
    total = 0.0
    for batch in self.preference_batches:
      n = float(jnp.sum(batch.is_preference_B))
      if n == 0:
        continue
      for k, v in self.objective_metrics(params, batch).items():
        if k in ("tokens",) or k.startswith(("grad/", "loss/general")):
          continue
        sums[k] = sums.get(k, 0.0) + n * float(v)
      total += n
    return {f"eval_data/{k}": v / total for k, v in sums.items()} if total else {}
