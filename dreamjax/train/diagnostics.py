"""On-device diagnostics of a model and its update: weight drift, residual growth, gradient norms.

Figures are flat dicts of scalars whose keys read as TensorBoard tags, with the layer in the
name, so the logger, the guard (`dreamjax.train.guard`) and `RUN/monitor.jsonl` all share them:

  drift/layer_i[/<matrix>], drift/max, drift/total     ||W − W_base|| / ||W_base||
  residual_growth/layer_i, residual_growth/max         mean over tokens of ||h_{i+1}|| / ||h_i||
  grad/layer_i/{norm,row_max,row_rms}[/<matrix>]       per-layer gradient norms (float32, per row)

Every function here is jittable and returns device arrays (`growth_vs_base` works on host floats).
Held-out perplexity and preference log-probs are in `dreamjax.train.evaluation`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from dreamjax.model import ModelConfig, forward, layout, positions_from_mask

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
