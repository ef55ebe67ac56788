"""Preference and SFT objectives over per-sequence log-probabilities (pure, jit-able).

Each objective returns `(loss, metrics)` with the metric names TRL users know
(`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
`logps/rejected`, `nll_loss`, and for ORPO `log_odds_ratio`, `log_odds_chosen`). Every metric is
a batch mean weighted by `weights_B` (default ones); examples with weight 0 are left out, so a
mixed or padded batch can switch examples off, and a batch whose weights are all 0 gives loss 0
and zero gradients, never NaN. Weights must be >= 0.

The objectives take `SeqLogProbs` rather than logits so that the caller decides which tokens count
(response only, or prompt + response) and where the reference model's numbers come from.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


class SeqLogProbs(NamedTuple):
  """Per-sequence log-probabilities of the labelled tokens."""

  sum_B: jax.Array  # float32 [B]: sum over mask == 1 tokens of log p(label)
  count_B: jax.Array  # float32 [B]: number of mask == 1 tokens
  mean_B: jax.Array  # float32 [B]: sum_B / count_B (0 where count_B == 0)


def _float(x: jax.Array) -> jax.Array:
  """Casts to float32 (float64 stays float64): bf16 is too coarse for log-probs and log-odds."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def sequence_logprobs(logits_BxTxV: jax.Array, labels_BxT: jax.Array, mask_BxT: jax.Array) -> SeqLogProbs:
  """Returns per-sequence sum, count and mean of log softmax(logits)[label] over mask == 1.

    logp_bt = logits_bt[label_bt] − logsumexp_v logits_btv      (in float32)
    sum_b   = Σ_t mask_bt · logp_bt,   count_b = Σ_t mask_bt,   mean_b = sum_b / max(count_b, 1)

  Logits at position t score labels at t (the caller shifts). Positions with mask 0 contribute
  nothing to values or gradients whatever they hold: huge or non-finite logits, and labels out of
  range such as TRL's -100 padding.

  Args:
    logits_BxTxV: logits, any float dtype (bf16 is upcast before the softmax).
    labels_BxT: integer token ids.
    mask_BxT: 1 where the token counts, 0 elsewhere (bool, int or float).
  """
  dtype = jnp.promote_types(logits_BxTxV.dtype, jnp.float32)  # float32, or float64 under x64
  on_BxT = mask_BxT > 0
  mask = on_BxT.astype(dtype)
  # Zero masked logits before the softmax: inf - inf in logsumexp would give NaN, and 0 · NaN
  # is NaN both forwards and in the backward pass.
  logits = jnp.where(on_BxT[..., None], logits_BxTxV.astype(dtype), 0.0)
  labels = jnp.where(on_BxT, labels_BxT, 0).astype(jnp.int32)  # out-of-range gather fills NaN
  # Gather the label logit and subtract logsumexp instead of materialising a log-softmax tensor.
  label_logit_BxT = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  logp_BxT = label_logit_BxT - jax.nn.logsumexp(logits, axis=-1)
  sum_B = jnp.sum(logp_BxT * mask, axis=-1)
  count_B = jnp.sum(mask, axis=-1)
  return SeqLogProbs(sum_B, count_B, sum_B / jnp.maximum(count_B, 1.0))


def _token_logprobs(logits_NxV: jax.Array, labels_N: jax.Array, on_N: jax.Array) -> jax.Array:
  """Returns log softmax(logits)[label] per row in float32 (0 where on_N is false)."""
  logits = jnp.where(on_N[..., None], logits_NxV.astype(jnp.promote_types(logits_NxV.dtype, jnp.float32)), 0.0)
  labels = jnp.where(on_N, labels_N, 0).astype(jnp.int32)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jnp.where(on_N, label_logit - jax.nn.logsumexp(logits, axis=-1), 0.0)


def linear_sequence_logprobs(hidden_BxTxD: jax.Array, head_DxV: jax.Array, labels_BxT: jax.Array,
                             mask_BxT: jax.Array, max_logits: int = 1 << 26) -> SeqLogProbs:
  """Returns `sequence_logprobs(hidden @ head, labels, mask)` without holding all B·T·V logits.

  The positions are taken in chunks of c tokens per row (c·B·V <= max_logits floats; one chunk
  when everything fits): each chunk's logits are computed in float32, reduced to log p(label) by
  its own log-sum-exp (exact, not an approximation) and dropped; the backward pass recomputes
  them chunk by chunk (jax.checkpoint), so a 248K vocabulary at a 512-token response holds one
  chunk of logits, not all of them. Same values and gradients as the unchunked form, to float32
  round-off.

  Args:
    hidden_BxTxD: what the LM head reads (the final-normed stream, `forward(...).head_input`).
    head_DxV: the LM head (`dreamjax.model.lm_head`).
    labels_BxT, mask_BxT: as `sequence_logprobs` (logits at t score labels at t).
    max_logits: most logits (floats) held at once.
  """
  b, t, _ = hidden_BxTxD.shape
  v = head_DxV.shape[1]
  on = mask_BxT > 0
  dtype = jnp.promote_types(hidden_BxTxD.dtype, jnp.float32)
  c = max(1, min(t, max_logits // max(b * v, 1)))

  def chunk_logp(h_BxCxD, lab_BxC, on_BxC):
    logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, head_DxV.astype(h_BxCxD.dtype), preferred_element_type=dtype)
    return _token_logprobs(logits, lab_BxC, on_BxC)

  if c >= t:
    logp_BxT = chunk_logp(hidden_BxTxD, labels_BxT, on)
  else:
    n = -(-t // c)
    pad = n * c - t
    split = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(
        b, n, c, *x.shape[2:]), 1, 0)  # (n, B, c, ...)
    logp = jax.lax.map(lambda xs: jax.checkpoint(chunk_logp)(*xs), (split(hidden_BxTxD), split(labels_BxT), split(on)))
    logp_BxT = jnp.moveaxis(logp, 0, 1).reshape(b, n * c)[:, :t]
  mask = on.astype(dtype)
  sum_B = jnp.sum(logp_BxT * mask, axis=-1)
  count_B = jnp.sum(mask, axis=-1)
  return SeqLogProbs(sum_B, count_B, sum_B / jnp.maximum(count_B, 1.0))


def _weights(lp: SeqLogProbs, weights_B: Optional[jax.Array]) -> jax.Array:
  dtype = jnp.promote_types(lp.sum_B.dtype, jnp.float32)
  return jnp.ones(lp.sum_B.shape, dtype) if weights_B is None else weights_B.astype(dtype)


def _wmean(x_B: jax.Array, w_B: jax.Array) -> jax.Array:
  """Returns Σ w x / Σ w over w > 0 (0 when all weights are 0); values under weight 0 are dropped."""
  x_B = jnp.where(w_B > 0, x_B, 0.0)  # drops non-finite garbage that 0 · x would keep
  total = jnp.sum(w_B)
  return jnp.sum(x_B * w_B) / jnp.maximum(total, 1e-12) * (total > 0)


def token_nll(lp: SeqLogProbs, w_B: jax.Array) -> jax.Array:
  """Returns the token-pooled NLL −Σ_b w_b sum_b / Σ_b w_b count_b (0 when no token counts).

  Token pooling matches torch's CrossEntropyLoss(reduction="mean") over a padded batch, which is
  what TRL's ORPO NLL and SFT losses use: long sequences weigh more than short ones.
  """
  on = w_B > 0
  s = jnp.sum(jnp.where(on, _float(lp.sum_B), 0.0) * w_B)
  n = jnp.sum(jnp.where(on, _float(lp.count_B), 0.0) * w_B)
  return -s / jnp.maximum(n, 1e-12) * (n > 0)


def log1mexp(x: jax.Array) -> jax.Array:
  """Returns log(1 − e^x) for x <= 0, stably (Mächler 2012), with finite gradients everywhere.

    log1mexp(x) = log1p(−e^x)     for x < −ln 2
                = log(−expm1(x))  otherwise

  Each form loses precision on the other's side of −ln 2. Both branches get safe inputs (the
  double-where trick) so the unused branch never sends a NaN into the gradient. x is clipped to
  <= −1e-30, so log1mexp(0) = log(1e-30) ≈ −69 instead of −inf.
  """
  x = jnp.minimum(x, -1e-30)
  small = x < -jnp.log(2.0)
  x_small = jnp.where(small, x, -1.0)
  x_big = jnp.where(small, -0.5, x)
  return jnp.where(small, jnp.log1p(-jnp.exp(x_small)), jnp.log(-jnp.expm1(x_big)))


def sft(policy: SeqLogProbs, weights_B: Optional[jax.Array] = None) -> tuple[jax.Array, Metrics]:
  """Returns (loss, metrics): the token-pooled NLL of the labelled tokens.

    loss = −Σ_b w_b sum_b / Σ_b w_b count_b

  Metrics: `nll_loss` (= loss) and `logps/chosen` (mean per-token log-prob).
  """
  w = _weights(policy, weights_B)
  nll = token_nll(policy, w)
  return nll, {"nll_loss": nll, "logps/chosen": _wmean(_float(policy.mean_B), w)}


def orpo(
    chosen: SeqLogProbs,
    rejected: SeqLogProbs,
    beta: float = 0.1,
    weights_B: Optional[jax.Array] = None,
    nll_extra: Optional[SeqLogProbs] = None,
) -> tuple[jax.Array, Metrics]:
  """Returns (loss, metrics) of ORPO as TRL's ORPOTrainer computes it (Hong et al. 2024, 2403.07691).

    l_c, l_r  = per-token-mean log-probs of the chosen and rejected responses (mean_B, float32)
    log_odds  = log[odds(y_w) / odds(y_l)],  odds(y) = P(y) / (1 − P(y)),  P(y) = e^l
              = (l_c − l_r) − (log1mexp(l_c) − log1mexp(l_r))
    loss      = NLL(chosen) − beta · mean_b log σ(log_odds_b)

  The paper's L_SFT + λ L_OR with λ = beta. NLL is token-pooled over the batch's chosen response
  tokens, or over `nll_extra` when given (e.g. prompt + response tokens in full-backprop mode,
  which is what recent TRL versions use for decoder-only models). log1mexp keeps the loss and its
  gradient finite as l_c → 0, where TRL's log1p(−exp(l)) gives −inf.

  Args:
    chosen, rejected: policy log-probs of the preferred and dispreferred responses.
    beta: weight of the odds-ratio term (λ in the paper).
    weights_B: optional per-example weights >= 0 (default ones).
    nll_extra: optional log-probs whose tokens the NLL term covers instead of `chosen`.

  Metrics: rewards = beta · l (per-token means, as TRL's ORPO); `log_odds_ratio` =
  mean log σ(log_odds), `log_odds_chosen` = mean log_odds.
  """
  w = _weights(chosen, weights_B)
  lc, lr = _float(chosen.mean_B), _float(rejected.mean_B)
  log_odds_B = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
  ratio_B = jax.nn.log_sigmoid(log_odds_B)
  nll = token_nll(nll_extra if nll_extra is not None else chosen, w)
  or_term = _wmean(ratio_B, w)
  loss = nll - beta * or_term
  rc, rr = beta * lc, beta * lr
  return loss, {
      "nll_loss": nll,
      "log_odds_ratio": or_term,
      "log_odds_chosen": _wmean(log_odds_B, w),
      "rewards/chosen": _wmean(rc, w),
      "rewards/rejected": _wmean(rr, w),
      "rewards/accuracies": _wmean((rc > rr).astype(w.dtype), w),
      "rewards/margins": _wmean(rc - rr, w),
      "logps/chosen": _wmean(lc, w),
      "logps/rejected": _wmean(lr, w),
  }


def _reference_metrics(beta, chosen, rejected, ref_chosen, ref_rejected, w) -> Metrics:
  """Returns TRL's DPO metrics: rewards = beta · (log π − log π_ref) on summed log-probs."""
  rc = beta * (_float(chosen.sum_B) - _float(ref_chosen.sum_B))
  rr = beta * (_float(rejected.sum_B) - _float(ref_rejected.sum_B))
  return {
      "rewards/chosen": _wmean(rc, w),
      "rewards/rejected": _wmean(rr, w),
      "rewards/accuracies": _wmean((rc > rr).astype(w.dtype), w),
      "rewards/margins": _wmean(rc - rr, w),
      "logps/chosen": _wmean(_float(chosen.sum_B), w),
      "logps/rejected": _wmean(_float(rejected.sum_B), w),
      "nll_loss": token_nll(chosen, w),  # diagnostic only: not part of the loss
  }


def dpo(
    chosen: SeqLogProbs,
    rejected: SeqLogProbs,
    ref_chosen: SeqLogProbs,
    ref_rejected: SeqLogProbs,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    weights_B: Optional[jax.Array] = None,
) -> tuple[jax.Array, Metrics]:
  """Returns (loss, metrics) of sigmoid DPO on summed log-probs (Rafailov et al. 2023, 2305.18290).

    z    = beta · [(log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l))]
    loss = mean_b [−(1 − ε) log σ(z_b) − ε log σ(−z_b)]

  ε = label_smoothing is the conservative-DPO label noise (TRL's loss_type="sigmoid"). Metrics:
  rewards = beta · (log π − log π_ref); `logps/*` are summed log-probs; `nll_loss` is the
  token-pooled NLL of the chosen responses (logged, not optimised).
  """
  w = _weights(chosen, weights_B)
  z = beta * (
      (_float(chosen.sum_B) - _float(rejected.sum_B)) - (_float(ref_chosen.sum_B) - _float(ref_rejected.sum_B))
  )
  loss_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return _wmean(loss_B, w), _reference_metrics(beta, chosen, rejected, ref_chosen, ref_rejected, w)


def dpop(
    chosen: SeqLogProbs,
    rejected: SeqLogProbs,
    ref_chosen: SeqLogProbs,
    ref_rejected: SeqLogProbs,
    beta: float = 0.1,
    lam: float = 50.0,
    weights_B: Optional[jax.Array] = None,
) -> tuple[jax.Array, Metrics]:
  """Returns (loss, metrics) of DPO-Positive (Pal et al. 2024, arXiv 2402.13228, corrected form).

    Δ_w  = log π(y_w) − log π_ref(y_w),   Δ_l = log π(y_l) − log π_ref(y_l)   (summed log-probs)
    loss = mean_b −log σ(beta · [(Δ_w − Δ_l) − lam · max(0, log π_ref(y_w) − log π(y_w))])

  The penalty is active only while the policy gives the preferred answer less likelihood than the
  reference, which plain DPO allows (both likelihoods can fall as long as the margin grows).
  With the penalty inactive this is DPO with label_smoothing = 0. Metrics as `dpo`, plus
  `dpop_penalty` = mean max(0, log π_ref(y_w) − log π(y_w)).
  """
  w = _weights(chosen, weights_B)
  pc, pr = _float(chosen.sum_B), _float(rejected.sum_B)
  rc, rr = _float(ref_chosen.sum_B), _float(ref_rejected.sum_B)
  penalty_B = jnp.maximum(0.0, rc - pc)
  loss_B = -jax.nn.log_sigmoid(beta * (((pc - rc) - (pr - rr)) - lam * penalty_B))
  metrics = _reference_metrics(beta, chosen, rejected, ref_chosen, ref_rejected, w)
  metrics["dpop_penalty"] = _wmean(penalty_B, w)
  return _wmean(loss_B, w), metrics


LogProbs = Mapping[str, SeqLogProbs]  # 'chosen'[, 'rejected', 'ref_chosen', 'ref_rejected', 'nll']


@dataclasses.dataclass(frozen=True)
class Objective:
  """A preference objective as a value: what the train step computes and what it feeds the loss.

  loss(lp, weights_B, **kwargs) -> (loss, metrics), where lp holds the policy's per-example
  SeqLogProbs 'chosen', with needs_rejected 'rejected', with needs_reference the frozen reference
  model's 'ref_chosen' and 'ref_rejected', and optionally 'nll' (the tokens the NLL term covers
  when they differ from the chosen response's; see `orpo`). weights_B masks the examples the
  objective applies to (the rest of a mixed batch gets SFT). A new objective is one `Objective`
  in `OBJECTIVES` (or passed to `make_train_step` directly): nothing else dispatches on names.
  """

  name: str
  loss: Callable[..., tuple[jax.Array, Metrics]]
  needs_rejected: bool = True
  needs_reference: bool = False


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("orpo", lambda lp, w, **kw: orpo(lp["chosen"], lp["rejected"], weights_B=w, nll_extra=lp.get("nll"),
                                              **kw)),
    Objective("sft", lambda lp, w, **kw: sft(lp["chosen"], weights_B=w, **kw), needs_rejected=False),
    Objective("dpo", lambda lp, w, **kw: dpo(lp["chosen"], lp["rejected"], lp["ref_chosen"], lp["ref_rejected"],
                                             weights_B=w, **kw), needs_reference=True),
    Objective("dpop", lambda lp, w, **kw: dpop(lp["chosen"], lp["rejected"], lp["ref_chosen"], lp["ref_rejected"],
                                               weights_B=w, **kw), needs_reference=True),
)}


def get(objective: "str | Objective") -> Objective:
  """Returns the Objective named `objective` (an Objective is returned as is); ValueError names the choices."""
  if isinstance(objective, Objective):
    return objective
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[objective]
