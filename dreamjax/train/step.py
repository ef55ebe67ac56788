"""One jitted preference step; the gradient mode and the objective are arguments.

gradient_mode='frozen' (the gradient-scale defence): all context tokens but the last are
prefilled under stop_gradient into a Cache, in chunks and without the LM head; chosen and
rejected both continue that cache (the context is encoded once per example, and its K/V are
read by both continuations, never copied); [last context token] + response then run from the
cache with gradient, and the LM head runs only where a response token is scored. The gradient still reaches every weight through the response tokens' own
computation (their queries read the frozen K/V, DeltaNet continues from the frozen state), but
nothing flows back into how the context was encoded.

gradient_mode='full': the standard baseline (what TRL does): context + response in one forward,
backpropagating through the context, separately for chosen and rejected.

Both modes give the same loss; frozen mode's gradient equals full mode's gradient with
stop_gradient on the activations of every context position but the last.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dreamjax import objectives as obj
from dreamjax.model import ModelConfig, forward, lm_head, positions_from_mask, prefill
from dreamjax.train import diagnostics
from dreamjax.train.batch import PreferenceBatch

GRADIENT_MODES = ("frozen", "full")


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a pytree ready for Orbax."""

  params: Any  # model params (float32 master weights)
  opt_state: Any  # optax state (incl. APOLLO keys and low-rank moments)
  step: jax.Array  # int32 scalar
  rng: jax.Array  # PRNG key; per-step randomness is fold_in(rng, step)


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
  return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------------------------
# Per-sequence log-probabilities of the responses, in either gradient mode.


def _response_inputs(batch: PreferenceBatch, with_rejected: bool = True):
  """Returns the response pass inputs: chosen and rejected interleaved as (2B, R), or chosen (B, R)."""
  if not with_rejected:
    return batch.chosen_BxR, batch.chosen_mask_BxR
  resp = jnp.stack([batch.chosen_BxR, batch.rejected_BxR], axis=1)  # (B, 2, R)
  rmask = jnp.stack([batch.chosen_mask_BxR, batch.rejected_mask_BxR], axis=1)
  b, _, r = resp.shape
  return resp.reshape(2 * b, r), rmask.reshape(2 * b, r)


def _split(lp: obj.SeqLogProbs, k: int):
  """Returns the k interleaved continuations' SeqLogProbs (rows i, i + k, ...) as a tuple."""
  return tuple(obj.SeqLogProbs(*(x[i::k] for x in lp)) for i in range(k))


def _scored(out, params, config: ModelConfig, labels_BxR, mask_BxR, start: int = 0) -> obj.SeqLogProbs:
  """Returns the SeqLogProbs of the labels from `out.head_input[:, start:]`, logits in chunks."""
  hidden = out.head_input[:, start:] if start else out.head_input
  return obj.linear_sequence_logprobs(hidden, lm_head(params, config), labels_BxR, mask_BxR)


def response_logprobs_frozen(params, batch: PreferenceBatch, config: ModelConfig, remat=False,
                             with_rejected: bool = True, dropout=(0.0, None)):
  """Returns (chosen, rejected) SeqLogProbs with the context frozen (see module docstring).

  The context (all but its last token) is prefilled under stop_gradient, `config.prefill_chunk`
  tokens at a time, without the LM head; chosen and rejected both continue that one cache (a
  shared cache: its K/V are read by both, not copied); the head is applied only at the response
  positions.
  with_rejected=False: (chosen,) only, the rejected pass skipped (SFT has no use for it).
  dropout: (rate, key) for the response pass; the frozen context is encoded as at inference.
  """
  ctx, cmask = batch.context_BxC, batch.context_mask_BxC
  b, c = ctx.shape
  k = 2 if with_rejected else 1  # continuations per context
  resp, rmask = _response_inputs(batch, with_rejected)  # (kB, R)
  r = resp.shape[1]
  cpos = positions_from_mask(cmask)
  frozen = jax.lax.stop_gradient(params)
  cache = prefill(frozen, ctx[:, :-1], cpos[:, :-1], cmask[:, :-1], config=config, capacity=c - 1,
                  dtype=params["embed"].dtype)
  cache = jax.lax.stop_gradient(cache)  # shared by the k continuations of its row (read, never copied)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  inp = jnp.concatenate([rep(ctx[:, -1:]), resp[:, :-1]], axis=1)  # [last context token, resp[:-1]]
  imask = jnp.concatenate([jnp.ones((k * b, 1), rmask.dtype), rmask[:, :-1]], axis=1)
  n_ctx = jnp.sum(cmask, axis=1)
  ipos = rep(n_ctx - 1)[:, None] + jnp.arange(r)[None, :]
  out = forward(params, inp, ipos, imask, cache, config=config, head=False, write_cache=False, remat=remat,
                dropout_rate=dropout[0], dropout_key=dropout[1])
  return _split(_scored(out, params, config, resp, rmask), k)


def response_logprobs_full(params, batch: PreferenceBatch, config: ModelConfig, remat=False,
                           with_prompt: bool = False, with_rejected: bool = True, dropout=(0.0, None)):
  """Returns (chosen, rejected[, chosen prompt+response]) SeqLogProbs by full backprop.

  The LM head is applied only where a label is scored (the response; with_prompt the chosen
  rows' context too), in chunks (`objectives.linear_sequence_logprobs`).
  with_rejected=False: the rejected pass is skipped and the tuple starts (chosen, ...).
  dropout: (rate, key) of training-time residual dropout (`dreamjax.model.decoder.dropout`).
  """
  ctx, cmask = batch.context_BxC, batch.context_mask_BxC
  b, c = ctx.shape
  k = 2 if with_rejected else 1  # continuations per context
  resp, rmask = _response_inputs(batch, with_rejected)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  inp = jnp.concatenate([rep(ctx), resp[:, :-1]], axis=1)  # (2B, C + R − 1)
  imask = jnp.concatenate([rep(cmask), rmask[:, :-1]], axis=1)
  out = forward(params, inp, positions_from_mask(imask), imask, config=config, head=False, remat=remat,
                dropout_rate=dropout[0], dropout_key=dropout[1])
  lps = _split(_scored(out, params, config, resp, rmask, start=c - 1), k)
  if not with_prompt:
    return lps
  # Prompt tokens too (TRL's default for ORPO's NLL): the stream at t predicts context[t + 1].
  chosen = lps[0]
  plp = obj.linear_sequence_logprobs(out.head_input[0::k, : c - 1], lm_head(params, config), ctx[:, 1:],
                                     cmask[:, :-1] * cmask[:, 1:])
  both = obj.SeqLogProbs(chosen.sum_B + plp.sum_B, chosen.count_B + plp.count_B,
                         (chosen.sum_B + plp.sum_B) / jnp.maximum(chosen.count_B + plp.count_B, 1.0))
  return lps + (both,)


def response_logprobs(params, batch, config, gradient_mode, remat=False, with_rejected=True, dropout=(0.0, None)):
  """Returns (chosen, rejected) SeqLogProbs in a gradient mode; (chosen,) with with_rejected=False."""
  if gradient_mode == "frozen":
    return response_logprobs_frozen(params, batch, config, remat, with_rejected, dropout)
  if gradient_mode == "full":
    return response_logprobs_full(params, batch, config, remat, with_rejected=with_rejected, dropout=dropout)
  raise ValueError(f"gradient_mode must be one of {GRADIENT_MODES}, got {gradient_mode!r}")


# ---------------------------------------------------------------------------------------------
# The loss of a (mixed) batch.


def example_logprobs(params, batch: PreferenceBatch, *, config: ModelConfig, objective: obj.Objective | str,
                     gradient_mode: str, ref_params=None, remat: bool = False, nll_on_prompt: bool = False,
                     compute_dtype=None, dropout=(0.0, None)) -> dict:
  """Returns the per-example log-prob statistics `objective` needs: {'chosen'[, 'rejected', 'nll', 'ref_*']}.

  An objective without needs_rejected (SFT) skips the rejected pass (no key 'rejected'), which
  halves the response (full mode: the whole) forward and backward.
  dropout: (rate, key) for the policy's passes; the reference model runs without it.
  """
  objective = obj.get(objective)
  cast = (lambda p: jax.tree.map(lambda x: x.astype(compute_dtype), p)) if compute_dtype else (lambda p: p)
  p = cast(params)
  out = {}
  names = ("chosen", "rejected") if objective.needs_rejected else ("chosen",)
  if nll_on_prompt:
    if gradient_mode != "full":
      raise ValueError("nll_on_prompt needs gradient_mode='full' (a frozen context takes no gradient)")
    lps = response_logprobs_full(p, batch, config, remat, with_prompt=True, with_rejected=len(names) == 2,
                                 dropout=dropout)
    out.update(zip(names + ("nll",), lps))
  else:
    out.update(zip(names, response_logprobs(p, batch, config, gradient_mode, remat, with_rejected=len(names) == 2,
                                            dropout=dropout)))
  if objective.needs_reference:
    if ref_params is None:
      raise ValueError(f"objective {objective.name!r} needs ref_params (a frozen reference model)")
    ref = response_logprobs(jax.lax.stop_gradient(cast(ref_params)), batch, config, "frozen")
    out["ref_chosen"], out["ref_rejected"] = jax.lax.stop_gradient(ref)
  return out


def loss_from_logprobs(lp: dict, is_preference_B, *, objective: obj.Objective | str, objective_kwargs: Optional[dict] = None):
  """Returns (loss, metrics) of a batch mixing preference and general (SFT) examples.

  loss = f_pref · objective(preference examples) + f_gen · SFT(general examples), f being the
  fractions of the batch's examples in each group.
  """
  chosen, rejected = lp["chosen"], lp.get("rejected")
  w_pref = is_preference_B.astype(jnp.float32)
  w_gen = 1.0 - w_pref
  pref_loss, metrics = obj.get(objective).loss(lp, w_pref, **dict(objective_kwargs or {}))
  gen_loss, _ = obj.sft(chosen, weights_B=w_gen)
  n = w_pref.shape[0]
  f_pref, f_gen = jnp.sum(w_pref) / n, jnp.sum(w_gen) / n
  loss = f_pref * pref_loss + f_gen * gen_loss
  metrics = dict(metrics, **{"loss": loss, "loss/preference": pref_loss, "loss/general": gen_loss,
                             "tokens": jnp.sum(chosen.count_B) + (0.0 if rejected is None else
                                                                  jnp.sum(rejected.count_B * w_pref))})
  return loss, metrics


def batch_loss(params, batch: PreferenceBatch, *, config: ModelConfig, objective: obj.Objective | str, gradient_mode: str,
               objective_kwargs: Optional[dict] = None, ref_params=None, remat: bool = False,
               nll_on_prompt: bool = False, compute_dtype=None, dropout=(0.0, None)):
  """Returns (loss, metrics) of a batch (see `loss_from_logprobs`)."""
  lp = example_logprobs(params, batch, config=config, objective=objective, gradient_mode=gradient_mode,
                        ref_params=ref_params, remat=remat, nll_on_prompt=nll_on_prompt, compute_dtype=compute_dtype,
                        dropout=dropout)
  return loss_from_logprobs(lp, batch.is_preference_B, objective=objective, objective_kwargs=objective_kwargs)


def accumulated_value_and_grad(params, batch: PreferenceBatch, grad_accum: int, ref_params=None, **kw):
  """Returns ((loss, metrics), grads) of the whole batch, computed over `grad_accum` micro-batches.

  Exact for any objective, whose normalisers (token counts, example means) span the whole batch:
  pass 1 scans the micro-batches for per-example log-prob statistics (no gradient); the loss and its
  gradient with respect to those statistics come from the full batch; pass 2 scans again and
  pulls that cotangent back through each micro-batch (a VJP). Memory is one micro-batch's
  activations; the cost is one extra forward pass.
  """
  b = batch.batch_size
  if b % grad_accum:
    raise ValueError(f"batch size {b} is not divisible by grad_accum {grad_accum}")
  micro = jax.tree.map(lambda x: x.reshape(grad_accum, b // grad_accum, *x.shape[1:]), batch)
  objective, objective_kwargs = kw["objective"], kw.pop("objective_kwargs", None)
  rate, key = kw.pop("dropout", (0.0, None))

  def lp_fn(p, mb_i):  # micro-batch i drops with fold_in(key, i), the same mask in both passes
    mb, i = mb_i
    drop = (rate, jax.random.fold_in(key, i)) if key is not None else (rate, None)
    return example_logprobs(p, mb, ref_params=ref_params, dropout=drop, **kw)

  micro = (micro, jnp.arange(grad_accum))
  lp_micro = jax.lax.map(lambda mb: lp_fn(params, mb), micro)
  lp_all = jax.tree.map(lambda x: x.reshape(b, *x.shape[2:]), lp_micro)
  (loss, metrics), lp_bar = jax.value_and_grad(
      lambda lp: loss_from_logprobs(lp, batch.is_preference_B, objective=objective,
                                    objective_kwargs=objective_kwargs), has_aux=True)(lp_all)
  lp_bar_micro = jax.tree.map(lambda x: x.reshape(grad_accum, b // grad_accum, *x.shape[1:]), lp_bar)

  def body(acc, xs):
    mb, bar = xs
    _, vjp = jax.vjp(lambda p: lp_fn(p, mb), params)
    (g,) = vjp(bar)
    return jax.tree.map(jnp.add, acc, g), None

  grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (micro, lp_bar_micro))
  return (loss, metrics), grads


# ---------------------------------------------------------------------------------------------


def make_train_step(
    config: ModelConfig,
    objective: obj.Objective | str,
    optimizer: optax.GradientTransformation,
    gradient_mode: str = "frozen",
    mesh: Optional[jax.sharding.Mesh] = None,
    *,
    objective_kwargs: Optional[dict] = None,
    remat: bool | str = False,
    compute_dtype=None,
    nll_on_prompt: bool = False,
    grad_accum: int = 1,
    donate: bool = True,
    skip_nonfinite: bool = False,
    grad_stats: bool = False,
    dropout: float = 0.0,
) -> Callable:
  """Returns a jitted `(state, batch[, ref_params]) -> (state, metrics)`.

  Args:
    objective: an `objectives.Objective`, or the name of one in `objectives.OBJECTIVES` ('orpo',
      'sft', 'dpo', 'dpop'); one with needs_reference takes `ref_params` (a frozen reference model).
    gradient_mode: 'frozen' (context encoded once without gradient) or 'full' (baseline).
    mesh: a ('data', 'fsdp') mesh; state and batch get its shardings (see dreamjax.train.mesh).
    remat: rematerialise each scanned block of layers in the backward pass: True / 'full' (keep
      only block inputs), 'dots' (keep projection outputs), False / 'none' (keep everything).
    compute_dtype: e.g. jnp.bfloat16 to compute in bf16 over float32 master weights.
    nll_on_prompt: ORPO's NLL also covers prompt tokens (TRL's default; full mode only).
    grad_accum: split the batch into this many micro-batches (exactly the large-batch gradient;
      see `accumulated_value_and_grad`).
    dropout: residual dropout rate while training (`dreamjax.model.decoder.dropout`); the mask's key
      is fold_in(state.rng, state.step), so a step is reproducible. Frozen mode drops only in the
      response pass (the context is encoded as at inference); the reference model never drops.
    skip_nonfinite: a step whose loss or gradient norm is NaN/Inf keeps the old params and
      optimizer state (the step counter still advances; metrics['skipped'] = 1).
    grad_stats: add per-layer gradient norms (float32, per-row; `monitor.layer_grad_norms`).
  """
  if gradient_mode not in GRADIENT_MODES:
    raise ValueError(f"gradient_mode must be one of {GRADIENT_MODES}, got {gradient_mode!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}")
  objective = obj.get(objective)
  kw = dict(config=config, objective=objective, gradient_mode=gradient_mode, objective_kwargs=objective_kwargs,
            remat=remat, nll_on_prompt=nll_on_prompt, compute_dtype=compute_dtype)

  def step(state: TrainState, batch: PreferenceBatch, ref_params=None):
    skw = dict(kw, dropout=(float(dropout), jax.random.fold_in(state.rng, state.step))) if dropout else kw
    if grad_accum > 1:
      (loss, metrics), grads = accumulated_value_and_grad(state.params, batch, grad_accum, ref_params, **skw)
    else:
      (loss, metrics), grads = jax.value_and_grad(functools.partial(batch_loss, **skw), has_aux=True)(
          state.params, batch, ref_params=ref_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(metrics, grad_norm=grad_norm, update_norm=optax.tree.norm(updates))
    if grad_stats:
      metrics.update(diagnostics.layer_grad_norms(grads, config, per_matrix=False))
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), (params, opt_state),
                                       (state.params, state.opt_state))
      metrics["skipped"] = (~ok).astype(jnp.int32)
    return TrainState(params, opt_state, state.step + 1, state.rng), metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=(0,) if donate else ())
  from dreamjax.train import mesh as mesh_lib

  def shard(state, batch, ref_params=None):
    s_shard = jax.tree.map(lambda x: x, mesh_lib.tree_shardings(state, mesh))
    b_shard = jax.tree.map(lambda _: mesh_lib.batch_sharding(mesh), batch)
    r_shard = mesh_lib.tree_shardings(ref_params, mesh) if ref_params is not None else None
    return s_shard, b_shard, r_shard

  cache = {}

  def jitted(state, batch, ref_params=None):
    key = (jax.tree.structure(state), jax.tree.structure(batch), ref_params is None)
    if key not in cache:
      s_shard, b_shard, r_shard = shard(state, batch, ref_params)
      cache[key] = jax.jit(step, in_shardings=(s_shard, b_shard, r_shard),
                           out_shardings=(s_shard, mesh_lib.replicated(mesh)),
                           donate_argnums=(0,) if donate else ())
    return cache[key]

  # Under the mesh, the model pins activations' batch axis to ('data', 'fsdp') (dreamjax.model.shard).
  def sharded_step(state, batch, ref_params=None):
    with jax.set_mesh(mesh):
      return jitted(state, batch, ref_params)(state, batch, ref_params)

  def lower(state, batch, ref_params=None):
    """Like a jitted function's: lower with abstract inputs (jax.ShapeDtypeStruct), e.g. bench/scale_plan.py."""
    with jax.set_mesh(mesh):
      return jitted(state, batch, ref_params).lower(state, batch, ref_params)

  sharded_step.lower = lower
  return sharded_step
