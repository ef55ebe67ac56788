"""Drift monitors and the guard that decides continue or abort-and-rollback.

Figures are flat dicts of scalars whose keys read as TensorBoard tags, with the layer in the
name, so the logger, the guard and `RUN/monitor.jsonl` all share them:

  perplexity, perplexity/base, perplexity/ratio        held-out general text (`Monitor`)
  logps/chosen, logps/rejected                         held-out preference pairs, mean per token
  logps/chosen/fall, logps/chosen/slope                the trend of the preferred likelihood
  drift/layer_i[/<matrix>], drift/max, drift/total     ||W − W_base|| / ||W_base||
  residual_growth/layer_i, residual_growth/max         mean over tokens of ||h_{i+1}|| / ||h_i||
  grad/layer_i/{norm,row_max,row_rms}[/<matrix>]       per-layer gradient norms (float32, per row)

The jittable functions (`general_nll`, `general_perplexity`, `weight_drift`, `residual_growth`,
`layer_grad_norms`, `guard_nonfinite_update`) return device arrays; `Monitor`, `LogpTrend`,
`NonfiniteCounter` and `Guard` live on the host. On several hosts every process computes the
same figures and decisions, but only the main process writes monitor.jsonl; broadcast the action
of process 0 (`jax.experimental.multihost_utils.broadcast_one_to_all`) if hosts could disagree
(e.g. after `Guard.restore` from a file only process 0 can read).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax import objectives as obj
from dreamjax.model import ModelConfig, forward, layout, lm_head, positions_from_mask
from dreamjax.train import step as step_lib
from dreamjax.train.batch import PreferenceBatch

Figures = dict[str, Any]

_TINY = 1e-30  # keeps ratios finite when a norm is exactly zero


# ---------------------------------------------------------------------------------------------
# Naming.


def layer_name(i: int, num_layers: int) -> str:
  """Returns 'layer_i' zero-padded to the width of the last index (so tags sort in layer order)."""
  return f"layer_{i:0{len(str(max(num_layers - 1, 0)))}d}"


def _leaves_with_names(tree) -> list[tuple[str, jax.Array]]:
  """Returns (path joined with '/', leaf) for every leaf of a nested dict/list."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    out.append(("/".join(parts), leaf))
  return out


def _stats(params, config: ModelConfig, stat) -> list[tuple[str, bool, list[tuple[str, Any]]]]:
  """Returns [(group, is_layer, [(leaf name within group, stat of that leaf)])], layers first.

  `stat(x, stacked)` reduces a leaf: for a stacked layer leaf (stacked=True, dreamjax.model.layout)
  it must return per-layer results with the layer axis leading, computed for all layers of the
  stack at once (one op per leaf, not per layer, so a 64-layer model compiles as fast as a 4-layer
  one); groups then index them per layer, in model order. Top-level leaves (embed, lm_head,
  final_norm) follow as groups of their own.
  """
  if not isinstance(params, Mapping) or layout.LAYERS not in params:
    raise ValueError("expected model params: a dict with stacked 'layers' (see dreamjax.model.layout)")
  per_kind = {kind: [(name, stat(x, True)) for name, x in _leaves_with_names(tree)]
              for kind, tree in params[layout.LAYERS].items()}
  groups = []
  for i in range(config.num_layers):
    kind, j = layout.kind_index(config, i)
    if kind not in per_kind:
      raise ValueError(f"params have no {kind!r} layers, but layer {i} of the config is one")
    groups.append((layer_name(i, config.num_layers), True,
                   [(name, jax.tree.map(lambda v: v[j] if getattr(v, "ndim", 0) else v, st))
                    for name, st in per_kind[kind]]))
  for k in sorted(params):
    if k != layout.LAYERS:
      groups.append((k, False, [(name, stat(x, False)) for name, x in _leaves_with_names({k: params[k]})]))
  return groups


def _max(values: Sequence[jax.Array]) -> jax.Array:
  return jnp.max(jnp.stack(values)) if values else jnp.zeros((), jnp.float32)


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
# Weight drift.


def weight_drift(params, base_params, config: ModelConfig, per_matrix: bool = True) -> Figures:
  """Returns the relative drift ||W − W_base|| / ||W_base|| (Frobenius, float32) per layer and matrix.

    drift/layer_i          = sqrt(Σ_leaves ||ΔW||²) / sqrt(Σ_leaves ||W_base||²) over all leaves of layer i
    drift/layer_i/<path>   the same for each matrix of the layer (per_matrix)
    drift/<name>           top-level matrices (embed, lm_head)
    drift/max              max over layers;   drift/total: the whole model as one vector

  Vectors (norms, A_log, dt_bias) count in the layer and total figures only: zero-centred norm
  weights start at 0, where a relative figure of their own means nothing.
  """
  if jax.tree.structure(params) != jax.tree.structure(base_params):
    raise ValueError("weight_drift: params and base_params have different structures "
                     f"({jax.tree.structure(params)} vs {jax.tree.structure(base_params)})")
  for (path, w), (_, b) in zip(_leaves_with_names(params), _leaves_with_names(base_params)):
    if w.shape != b.shape:
      raise ValueError(f"weight_drift: {path} has shape {w.shape} but the base has {b.shape}")
  diff = jax.tree.map(lambda w, b: w.astype(jnp.float32) - b.astype(jnp.float32), params, base_params)

  def stat(x, stacked):  # (Σ x², is a matrix), per layer when stacked
    axes = tuple(range(1 if stacked else 0, x.ndim))
    return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes), x.ndim - stacked == 2

  rel = lambda d2, b2: jnp.sqrt(d2) / jnp.maximum(jnp.sqrt(b2), _TINY)
  out, layer_drifts, tot_d, tot_b = {}, [], 0.0, 0.0
  for (group, is_layer, leaves), (_, _, base_leaves) in zip(_stats(diff, config, stat),
                                                             _stats(base_params, config, stat)):
    g_d, g_b = 0.0, 0.0
    for (name, (d2, is_matrix)), (_, (b2, _)) in zip(leaves, base_leaves):
      g_d, g_b = g_d + d2, g_b + b2
      if is_matrix and (per_matrix or not is_layer):
        out[f"drift/{group}/{name}" if is_layer else f"drift/{name}"] = rel(d2, b2)
    tot_d, tot_b = tot_d + g_d, tot_b + g_b
    if is_layer:
      out[f"drift/{group}"] = rel(g_d, g_b)
      layer_drifts.append(out[f"drift/{group}"])
  out["drift/max"] = _max(layer_drifts)
  out["drift/total"] = rel(tot_d, tot_b)
  return out


# ---------------------------------------------------------------------------------------------
# Residual-norm growth.


def residual_growth(params, tokens_BxT: jax.Array, mask_BxT: jax.Array, config: ModelConfig,
                    positions_BxT: Optional[jax.Array] = None) -> Figures:
  """Returns per-layer residual growth: the token mean of ||h_{i+1}|| / ||h_i||, and its max.

    residual_growth/layer_i = Σ_bt m_bt ||h_{i+1,bt}|| / ||h_{i,bt}|| / Σ_bt m_bt
    residual_norm/layer_i   = Σ_bt m_bt ||h_{i,bt}|| / Σ_bt m_bt   (the stream entering layer i)

  h_i is the residual stream entering layer i (h_0 the embeddings, h_L the output of the last
  layer, before the final norm); norms over the model dimension in float32; pads (m = 0) excluded.
  """
  mask = mask_BxT.astype(bool)
  if positions_BxT is None:
    positions_BxT = positions_from_mask(mask_BxT)
  hidden = forward(params, tokens_BxT, positions_BxT, mask_BxT, config=config, head=False, return_hidden=True).hidden
  norms = [jnp.sqrt(jnp.sum(jnp.square(h.astype(jnp.float32)), axis=-1)) for h in hidden]  # (B, T) each
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = lambda x: jnp.sum(jnp.where(mask, x, 0.0)) / n
  num_layers = len(hidden) - 1
  out, growth = {}, []
  for i in range(num_layers):
    name = layer_name(i, num_layers)
    out[f"residual_growth/{name}"] = mean(norms[i + 1] / jnp.maximum(norms[i], _TINY))
    out[f"residual_norm/{name}"] = mean(norms[i])
    growth.append(out[f"residual_growth/{name}"])
  out["residual_norm/final"] = mean(norms[-1])
  out["residual_growth/max"] = _max(growth)
  return out


def growth_vs_base(figures: Mapping[str, Any], base_figures: Mapping[str, Any]) -> Figures:
  """Returns residual_growth/layer_i/vs_base = growth_i / base growth_i and their max (…/max_vs_base)."""
  out, ratios = {}, []
  for k, v in figures.items():
    if k.startswith("residual_growth/layer_"):
      if k not in base_figures:
        raise ValueError(f"growth_vs_base: {k} has no base figure (different layer counts?)")
      out[f"{k}/vs_base"] = float(v) / max(float(base_figures[k]), _TINY)
      ratios.append(out[f"{k}/vs_base"])
  out["residual_growth/max_vs_base"] = max(ratios) if ratios else 0.0
  return out


# ---------------------------------------------------------------------------------------------
# Per-layer gradient norms.


def layer_grad_norms(grads, config: ModelConfig, per_matrix: bool = True) -> Figures:
  """Returns per-layer gradient norms in float32, with per-row statistics of every matrix.

  For a matrix G (rows = axis 0 as stored, (in, out) for projections, tokens for embed):
    row norms r_j = ||G_j||,   row_max = max_j r_j,   row_rms = sqrt(mean_j r_j²)
  Per layer: grad/layer_i/norm = sqrt(Σ_leaves ||G||²) over all leaves, and row_max / row_rms
  pooled over the rows of all its matrices; per matrix (per_matrix) grad/layer_i/<path>/row_*.
  Top-level matrices get grad/<name>/{norm,row_max,row_rms}; grad/norm is the global norm and
  grad/layer_norm_max the largest layer norm.
  """

  def stat(g, stacked):  # (Σ g², row max, Σ row², rows) per layer when stacked; rows only for matrices
    g = g.astype(jnp.float32)
    lead = 1 if stacked else 0
    sq = jnp.sum(jnp.square(g), axis=tuple(range(lead, g.ndim)))
    if g.ndim - lead < 2:
      return sq, None
    rows_sq = jnp.sum(jnp.square(g), axis=tuple(range(lead + 1, g.ndim)))  # (L, rows) or (rows,)
    return sq, (jnp.sqrt(jnp.max(rows_sq, axis=-1)), jnp.sum(rows_sq, axis=-1), g.shape[lead])

  out, layer_norms, total = {}, [], 0.0
  for group, is_layer, leaves in _stats(grads, config, stat):
    sq, row_sq, n_rows, row_maxes = 0.0, 0.0, 0, []
    for name, (leaf_sq, rows) in leaves:
      sq = sq + leaf_sq
      if rows is None:
        continue
      rmax, rsq, n = rows
      row_maxes.append(rmax)
      row_sq, n_rows = row_sq + rsq, n_rows + n
      prefix = f"grad/{group}/{name}" if is_layer else f"grad/{name}"
      if per_matrix or not is_layer:
        out[f"{prefix}/row_max"] = rmax
        out[f"{prefix}/row_rms"] = jnp.sqrt(rsq / n)
      if not is_layer:
        out[f"{prefix}/norm"] = jnp.sqrt(rsq)
    total = total + sq
    if is_layer:
      out[f"grad/{group}/norm"] = jnp.sqrt(sq)
      out[f"grad/{group}/row_max"] = _max(row_maxes)
      out[f"grad/{group}/row_rms"] = jnp.sqrt(row_sq / max(n_rows, 1))
      layer_norms.append(out[f"grad/{group}/norm"])
  out["grad/norm"] = jnp.sqrt(total)
  out["grad/layer_norm_max"] = _max(layer_norms)
  return out


# ---------------------------------------------------------------------------------------------
# Non-finite steps.


def is_finite_step(loss: jax.Array, grad_norm: Optional[jax.Array] = None) -> jax.Array:
  """Returns a bool scalar: the loss (and the gradient norm, when given) are finite."""
  ok = jnp.all(jnp.isfinite(loss))
  return ok if grad_norm is None else ok & jnp.all(jnp.isfinite(grad_norm))


def guard_nonfinite_update(old_state, new_state, loss: jax.Array, grad_norm: Optional[jax.Array] = None):
  """Returns new_state, or old_state unchanged (every leaf, step counter included) when the loss or
  the gradient norm is not finite. Jittable: a `lax.cond` over the whole pytree, PRNG keys too.

  Keeping the old step counter repeats that step's randomness (fold_in(rng, step)) on the next
  batch; the host loop counts the skip (`NonfiniteCounter`) and moves the data on.
  """
  return jax.lax.cond(is_finite_step(loss, grad_norm), lambda o, n: n, lambda o, n: o, old_state, new_state)


@dataclasses.dataclass
class NonfiniteCounter:
  """Counts skipped (non-finite) steps; `exceeded` once more than `max_skips` were skipped in all."""

  max_skips: int  # K: up to K skipped steps are tolerated, the (K+1)-th aborts
  count: int = 0  # skipped steps so far
  consecutive: int = 0  # skipped steps since the last finite one

  def record(self, loss, grad_norm=None) -> bool:
    """Returns True when the step is non-finite (to be skipped), counting it."""
    finite = math.isfinite(float(loss)) and (grad_norm is None or math.isfinite(float(grad_norm)))
    if finite:
      self.consecutive = 0
      return False
    self.count += 1
    self.consecutive += 1
    return True

  @property
  def exceeded(self) -> bool:
    return self.count > self.max_skips


# ---------------------------------------------------------------------------------------------
# The preferred likelihood's trend.


def _slope(y: Sequence[float]) -> float:
  """Returns the least-squares slope of y against its index: Σ (i − ī)(y_i − ȳ) / Σ (i − ī)²."""
  x = np.arange(len(y), dtype=np.float64)
  x -= x.mean()
  return float(np.sum(x * (np.asarray(y, np.float64) - np.mean(y))) / np.sum(x * x))


@dataclasses.dataclass
class LogpTrend:
  """Tracks held-out mean log-probs of chosen and rejected responses across evals (host side).

  The DPO failure mode: both likelihoods fall, the margin grows, and the preferred response
  becomes less likely than it was. Figures per update (nats, in the caller's units):
    logps/chosen/fall   = first chosen − current chosen          (> 0: it fell)
    logps/chosen/slope  = least-squares slope over the last `window` evals, per eval
    logps/margin        = chosen − rejected
  """

  window: int = 5  # evals in the slope's window
  steps: list = dataclasses.field(default_factory=list)
  chosen: list = dataclasses.field(default_factory=list)
  rejected: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.window < 2:
      raise ValueError(f"LogpTrend: window must be >= 2 evals, got {self.window}")

  def update(self, step: int, chosen: float, rejected: Optional[float] = None) -> Figures:
    """Records one eval; returns the trend figures (slope only once `window` evals are in)."""
    self.steps.append(int(step))
    self.chosen.append(float(chosen))
    self.rejected.append(float("nan") if rejected is None else float(rejected))
    return self.figures()

  def figures(self) -> Figures:
    if not self.chosen:
      return {}
    out = {"logps/chosen/fall": self.chosen[0] - self.chosen[-1]}
    if len(self.chosen) >= self.window:
      out["logps/chosen/slope"] = _slope(self.chosen[-self.window :])
    if not math.isnan(self.rejected[-1]):
      out["logps/margin"] = self.chosen[-1] - self.rejected[-1]
    return out


# ---------------------------------------------------------------------------------------------
# The guard.


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """Thresholds of the guard; None switches a check off. Check names appear in the reasons."""

  max_perplexity_ratio: Optional[float] = 1.5  # 'perplexity': held-out perplexity / base perplexity
  max_weight_drift: Optional[float] = 0.5  # 'drift': max over layers of ||W − W_base|| / ||W_base||
  max_residual_growth: Optional[float] = None  # 'residual_growth': max_l ||h_{l+1}||/||h_l|| (model-specific)
  max_residual_growth_vs_base: Optional[float] = 2.0  # 'residual_growth_vs_base': max_l growth_l / base growth_l
  max_chosen_logp_fall: Optional[float] = 1.0  # 'chosen_fall': nats the chosen log-prob fell since the first eval
  min_chosen_logp_slope: Optional[float] = -0.05  # 'chosen_slope': slope per eval over trend_window evals
  trend_window: int = 5  # evals in the chosen log-prob slope
  max_nonfinite_steps: int = 10  # 'nonfinite': K skipped NaN/Inf steps tolerated; the (K+1)-th aborts
  abort_on_nonfinite_figure: bool = True  # 'nonfinite_figure': any NaN/Inf figure at an eval
  warn_only: tuple[str, ...] = ("chosen_slope",)  # checks that warn instead of aborting


_CHECKS = (  # (check name, figure key, GuardConfig field): abort when figure > limit
    ("perplexity", "perplexity/ratio", "max_perplexity_ratio"),
    ("drift", "drift/max", "max_weight_drift"),
    ("residual_growth", "residual_growth/max", "max_residual_growth"),
    ("residual_growth_vs_base", "residual_growth/max_vs_base", "max_residual_growth_vs_base"),
    ("chosen_fall", "logps/chosen/fall", "max_chosen_logp_fall"),
)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the guard decided at a step."""

  step: int
  action: str  # 'continue' | 'abort' (abort: roll back to Guard.rollback_step and stop)
  passed: bool  # every check passed (a skipped non-finite step never passes)
  reasons: tuple[str, ...] = ()  # failed checks, each 'name: what and the limit'
  warnings: tuple[str, ...] = ()  # failed warn-only checks
  kind: str = "eval"  # 'eval' | 'nonfinite' | 'step'


def _to_json(x):
  """Returns x as strict JSON: floats, with NaN/±Inf as the strings 'nan', 'inf', '-inf'."""
  if isinstance(x, Mapping):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (bool, str)) or x is None:
    return x
  a = np.asarray(x)
  if a.ndim:
    return [_to_json(v) for v in a.tolist()]
  if np.issubdtype(a.dtype, np.integer):
    return int(a)
  f = float(a)
  return f if math.isfinite(f) else str(f)


class Guard:
  """Decides continue or abort at every eval; appends each decision to RUN/monitor.jsonl.

  Usage:
    guard = Guard(run_dir, GuardConfig(...))
    d = guard.skip_nonfinite(step, loss, grad_norm)     # every step (host values)
    d = guard.decide(step, monitor.figures(params))      # every eval
    if d.action == 'abort': restore guard.rollback_step(checkpoint_steps) and stop.

  The file is only ever appended to. `restore(step)` replays it on resume.
  """

  def __init__(self, run_dir: str, config: GuardConfig = GuardConfig(), *, is_main_process: Optional[bool] = None):
    self.config = config
    self.path = os.path.join(run_dir, "monitor.jsonl")
    self.is_main_process = jax.process_index() == 0 if is_main_process is None else is_main_process
    self.trend = LogpTrend(window=config.trend_window)
    self.nonfinite = NonfiniteCounter(config.max_nonfinite_steps)
    self.last_passed_step: Optional[int] = None
    if self.is_main_process:
      os.makedirs(run_dir, exist_ok=True)

  # -- decisions -------------------------------------------------------------------------------

  def decide(self, step: int, figures: Mapping[str, Any]) -> Decision:
    """Returns the decision on one eval's figures (floats or scalar arrays) and logs it.

    When figures hold 'logps/chosen' (and 'logps/rejected'), the trend tracker is updated and
    its figures join the checked and logged ones. Checks whose figure is absent are not run.
    """
    figs = {k: _to_json(v) for k, v in figures.items()}
    if "logps/chosen" in figs:
      figs.update(self.trend.update(step, _num(figs["logps/chosen"]), _num(figs.get("logps/rejected"))))
    failed = []
    if self.config.abort_on_nonfinite_figure:
      bad = sorted(k for k, v in figs.items() if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)))
      if bad:
        failed.append(("nonfinite_figure", f"nonfinite_figure: {', '.join(f'{k} = {figs[k]}' for k in bad)}"))
    for name, key, field in _CHECKS:
      limit = getattr(self.config, field)
      if limit is None or key not in figs:
        continue
      v = _num(figs[key])
      if not math.isfinite(v) or v > limit:
        failed.append((name, f"{name}: {key} = {v:.6g} > {field} {limit:g}"))
    slope_limit = self.config.min_chosen_logp_slope
    if slope_limit is not None and "logps/chosen/slope" in figs:
      v = _num(figs["logps/chosen/slope"])
      if not v >= slope_limit:
        failed.append(("chosen_slope", f"chosen_slope: logps/chosen/slope = {v:.6g} per eval over the last "
                                       f"{self.trend.window} evals < min_chosen_logp_slope {slope_limit:g} "
                                       "(the preferred likelihood keeps falling)"))
    reasons = tuple(r for n, r in failed if n not in self.config.warn_only)
    warns = tuple(r for n, r in failed if n in self.config.warn_only)
    passed = not reasons
    if passed:
      self.last_passed_step = int(step)
    d = Decision(int(step), "continue" if passed else "abort", passed, reasons, warns, "eval")
    self._write(d, figs)
    return d

  def skip_nonfinite(self, step: int, loss, grad_norm=None) -> Decision:
    """Returns the decision on one step's loss: a non-finite step is skipped and counted
    (kind 'nonfinite', logged); more than `max_nonfinite_steps` skips in all abort. A finite step
    gives a passing 'step' decision that is not logged."""
    if not self.nonfinite.record(loss, grad_norm):
      return Decision(int(step), "continue", True, kind="step")
    n, k = self.nonfinite.count, self.config.max_nonfinite_steps
    what = f"loss = {float(loss)}" + ("" if grad_norm is None else f", grad_norm = {float(grad_norm)}")
    if self.nonfinite.exceeded:
      d = Decision(int(step), "abort", False, (f"nonfinite: {n} skipped non-finite steps > max_nonfinite_steps {k} "
                                               f"({what})",), kind="nonfinite")
    else:
      d = Decision(int(step), "continue", False, warnings=(f"nonfinite: step skipped ({what}); {n} of {k} "
                                                           "tolerated",), kind="nonfinite")
    self._write(d, {"loss": _to_json(loss), **({} if grad_norm is None else {"grad_norm": _to_json(grad_norm)})})
    return d

  def rollback_step(self, checkpoint_steps: Iterable[int]) -> Optional[int]:
    """Returns the newest checkpoint step <= the last step that passed (None if there is none)."""
    if self.last_passed_step is None:
      return None
    ok = [int(s) for s in checkpoint_steps if int(s) <= self.last_passed_step]
    return max(ok) if ok else None

  # -- the log ---------------------------------------------------------------------------------

  def _write(self, d: Decision, figures: Mapping[str, Any], **extra):
    if not self.is_main_process:
      return
    line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step": d.step, "kind": d.kind, "action": d.action, "passed": d.passed,
            "reasons": list(d.reasons), "warnings": list(d.warnings),
            "last_passed_step": self.last_passed_step, "nonfinite_count": self.nonfinite.count,
            "figures": figures, **extra}
    text = json.dumps(line, allow_nan=False) + "\n"
    if os.path.exists(self.path) and os.path.getsize(self.path):
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # a line cut by a crash: start ours on a fresh line
          text = "\n" + text
    with open(self.path, "a", encoding="utf-8") as f:  # append-only: earlier decisions stay as written
      f.write(text)
      f.flush()

  def restore(self, step: int) -> None:
    """Replays monitor.jsonl up to `step` (a resumed checkpoint's step): the last passed step,
    the non-finite count and the log-prob trend; lines after `step` (work the resume discards)
    are ignored. Appends a 'resume' line."""
    self.trend = LogpTrend(window=self.config.trend_window)
    self.nonfinite = NonfiniteCounter(self.config.max_nonfinite_steps)
    self.last_passed_step = None
    for line in read_monitor_log(self.path):
      if line.get("kind") == "resume" or line["step"] > step:
        continue
      figs = line.get("figures", {})
      if line["kind"] == "nonfinite":
        self.nonfinite.count += 1
      elif line["kind"] == "eval":
        if "logps/chosen" in figs:
          self.trend.update(line["step"], _num(figs["logps/chosen"]), _num(figs.get("logps/rejected")))
        if line["passed"]:
          self.last_passed_step = line["step"]
    self._write(Decision(int(step), "continue", True, kind="resume"), {})


def _num(v) -> Optional[float]:
  """Returns a JSON figure as a float ('nan'/'inf' strings included); None stays None."""
  return None if v is None else float(v)


def read_monitor_log(path: str) -> list[dict]:
  """Returns the decisions in a monitor.jsonl (empty if the file does not exist).

  A line cut short by a crash mid-write is skipped with a warning.
  """
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        warnings.warn(f"{path}: line {i} is not JSON ({e.msg}); skipped (a write cut short?)")
  return out


# ---------------------------------------------------------------------------------------------
# All figures of one eval.


class Monitor:
  """Computes one eval's figures against the base model; the base's own figures are cached.

  Args:
    base_params: the model before training (drift, perplexity and residual growth baselines).
    config: its ModelConfig.
    general_batches: held-out general text (collate of general_example), for perplexity; the
      first also serves residual growth.
    preference_batches: held-out preference pairs for the chosen/rejected trend (optional).
  """

  def __init__(self, base_params, config: ModelConfig, general_batches: Sequence[PreferenceBatch],
               preference_batches: Sequence[PreferenceBatch] = ()):
    if not general_batches:
      raise ValueError("Monitor needs at least one held-out general batch")
    self.base_params, self.config = base_params, config
    self.general_batches, self.preference_batches = list(general_batches), list(preference_batches)
    self._residual = jax.jit(residual_growth, static_argnames=("config",))
    self._drift = jax.jit(weight_drift, static_argnames=("config",))
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
    out.update(growth_vs_base(res, self._base_residual))
    if self.preference_batches:
      sc, sr, n = 0.0, 0.0, 0.0
      for batch in self.preference_batches:
        c, r, k = _preference_logps_jit(params, batch, config=self.config)
        sc, sr, n = sc + float(c), sr + float(r), n + float(k)
      if n > 0:
        out["logps/chosen"], out["logps/rejected"] = sc / n, sr / n
    return out
