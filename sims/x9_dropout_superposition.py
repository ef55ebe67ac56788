"""Issue 8, x9: does dropout reduce superposition in a layer and raise redundancy across layers?

The toy model of superposition (Elhage et al. 2022, "Toy Models of Superposition"): n = 20 features,
m = 5 hidden dimensions, feature importance I_i = 0.7^i, inputs x_i = u_i · [v_i < 1 − S] with u, v ~ U[0, 1]
(each feature present with probability 1 − S, the sparsity S).

One layer (the ReLU output model), W ∈ R^{m×n}, b ∈ R^n:
  h = W x,    x' = ReLU(Wᵀ drop_p(h) + b),    L = E_x Σ_i I_i (x_i − x'_i)²
drop_p is inverted dropout on the hidden h (train only): h_k · ξ_k / (1 − p), ξ_k ~ Bernoulli(1 − p).

Two-block residual version: a residual stream with an input subspace that carries x (read by every block,
never written) and an output subspace in the feature basis that starts at 0; block b ∈ {1, 2} is one such
ReLU output model (its own W_b ∈ R^{m×n}, b_b, dropout on its own hidden h_b = W_b x) and adds its output to
the stream; the read-out is the output subspace:
  x' = Σ_b ReLU(W_bᵀ drop_p(W_b x) + b_b)
(neither block reads the other's write, so the order of the blocks does not matter; each block keeps its own
ReLU, so the pair is not just one 2m-dimensional layer). Ablating block b at evaluation removes its write:
x'_{−b} = ReLU(W_{b'}ᵀ W_{b'} x + b_{b'}), b' ≠ b.

Every cell sparsity S ∈ {0, .7, .9, .99} × dropout p ∈ {0, .1, .3} trains both models with optax.adam (lr held,
then decayed to 0; see lr_schedule) from the same per-seed init and data stream (the cells of a seed are
matched); all cells and seeds are one jitted function (a scan over steps of a vmap over cells, vmapped over
seeds). Training is STEPS steps of batch BATCH, far shorter than Elhage et al.'s runs; in development a run of
6000 steps of batch 1024 at a constant lr 1e-3 gave the same represented counts and interference. Metrics per seed and
cell, evaluated on held-out inputs of the cell's sparsity without dropout (W_i is the i-th column of W,
Ŵ_i = W_i / ‖W_i‖):
  n_represented = #{i : ‖W_i‖ > 0.5}              R = that set
  norm2         = ‖W‖²_F = Σ_i ‖W_i‖²
  interference  = Σ_{i ∈ R} Σ_{j ∈ R, j ≠ i} (Ŵ_iᵀ W_j)²     (Elhage et al.'s per-feature superposition
                  Σ_{j≠i} (Ŵ_i·W_j)², summed over the represented features, counting only represented j)
  kurtosis      = mean_k E[(h_k − E h_k)⁴] / Var(h_k)²  (Pearson kurtosis of each hidden unit, Gaussian = 3)
  loss          = L without dropout
  res_loss      = two-block L;  res_damage = mean_b L(x'_{−b}) − L(x')   (loss increase from ablating a block)
  res_shared    = #{i : ‖W_{1,i}‖ > 0.5 and ‖W_{2,i}‖ > 0.5}   (features both blocks represent: redundancy)
Criteria (per cell with S ≥ .9): IQM(interference, p = .3) / IQM(interference, p = 0) ≤ 0.8, and
IQM(res_damage, p = .3) − IQM(res_damage, p = 0) < 0. Positive control: at S = .99 without dropout the layer
represents more than m features (superposition, the known result); negative control: at S = 0 it
represents at most m.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sims import harness

N_FEATURES, M_HIDDEN = 20, 5
IMPORTANCE_N = 0.7 ** np.arange(N_FEATURES)
SPARSITIES = (0.0, 0.7, 0.9, 0.99)
DROPOUTS = (0.0, 0.1, 0.3)
BLOCKS = 3  # block 0: the one-layer model; blocks 1, 2: the two-block residual model
REPRESENTED = 0.5  # ‖W_i‖ above this counts as represented
STEPS, QUICK_STEPS = 1000, 800
BATCH = 128
LR = 1e-2  # Adam's lr (see lr_schedule)
EVAL_N = 8192
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


def arm_name(sparsity: float, dropout: float) -> str:
  return f"s{round(100 * sparsity):02d}_d{round(100 * dropout):02d}"


CELLS = [(s, p) for s in SPARSITIES for p in DROPOUTS]
ARMS = {arm_name(s, p): (s, p) for s, p in CELLS}
HIGH = [s for s in SPARSITIES if s >= 0.9]


def lr_schedule(steps: int):
  """Returns Adam's lr: LR for the first 3/4 of the steps, then linear decay to 0 (warmup-free WSD)."""
  hold = (3 * steps) // 4
  return optax.join_schedules([optax.constant_schedule(LR), optax.linear_schedule(LR, 0.0, steps - hold)], [hold])


def sample_x(key, sparsity_C, n: int):
  """Returns x_CxBxN: the same uniforms for every cell, feature i present where v_i < 1 − S_c."""
  k_u, k_v = jax.random.split(key)
  u_BxN = jax.random.uniform(k_u, (n, N_FEATURES))
  v_BxN = jax.random.uniform(k_v, (n, N_FEATURES))
  present_CxBxN = v_BxN[None] < (1.0 - sparsity_C)[:, None, None]
  return jnp.where(present_CxBxN, u_BxN[None], 0.0)


def block_outputs(W_KxMxN, b_KxN, x_BxN, keep_BxKxM=None):
  """Returns each block's ReLU(W_bᵀ h_b + b_b), h_b = W_b x, as out_BxKxN (times keep on h if given)."""
  h_BxKxM = jnp.einsum("kmn,bn->bkm", W_KxMxN, x_BxN)
  if keep_BxKxM is not None:
    h_BxKxM = h_BxKxM * keep_BxKxM
  return jax.nn.relu(jnp.einsum("kmn,bkm->bkn", W_KxMxN, h_BxKxM) + b_KxN)


def weighted_mse(xhat_BxN, x_BxN):
  return jnp.mean(jnp.sum(IMPORTANCE_N * (x_BxN - xhat_BxN) ** 2, axis=-1))


def loss_both(params, x_BxN, keep_BxKxM):
  """Returns L(one layer) + L(two-block model): block 0 is the layer, blocks 1 and 2 the residual pair.

  The two models share no parameter, so the sum's gradient (and Adam, per coordinate) trains each on its own.
  """
  out_BxKxN = block_outputs(params["W_KxMxN"], params["b_KxN"], x_BxN, keep_BxKxM)
  return weighted_mse(out_BxKxN[:, 0], x_BxN) + weighted_mse(out_BxKxN[:, 1] + out_BxKxN[:, 2], x_BxN)


def train(key, sparsity_C, dropout_C, steps: int):
  """Returns params_C {'W_KxMxN', 'b_KxN'} (K = 3: the layer and the two blocks) trained in every cell c.

  Per step one batch of uniforms serves every cell (cell c thresholds them at its own S_c and p_c), so the
  cells of a seed see matched data and dropout draws.
  """
  k_init, k_data, k_drop = jax.random.split(key, 3)
  cells = sparsity_C.shape[0]
  std = np.sqrt(2.0 / (N_FEATURES + M_HIDDEN))  # Xavier normal, as Elhage et al.
  params = {"W_KxMxN": std * jax.random.normal(k_init, (BLOCKS, M_HIDDEN, N_FEATURES)),
            "b_KxN": jnp.zeros((BLOCKS, N_FEATURES))}
  params_C = jax.tree.map(lambda a: jnp.broadcast_to(a, (cells,) + a.shape), params)
  opt = optax.adam(lr_schedule(steps))
  state_C = jax.vmap(opt.init)(params_C)
  scale_C = 1.0 / (1.0 - dropout_C)

  def update(params, state, x_BxN, keep_BxKxM):
    grads = jax.grad(loss_both)(params, x_BxN, keep_BxKxM)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  def step(carry, t):
    params_C, state_C = carry
    x_CxBxN = sample_x(jax.random.fold_in(k_data, t), sparsity_C, BATCH)
    u_BxKxM = jax.random.uniform(jax.random.fold_in(k_drop, t), (BATCH, BLOCKS, M_HIDDEN))
    keep_CxBxKxM = jnp.where(u_BxKxM[None] >= dropout_C[:, None, None, None], scale_C[:, None, None, None], 0.0)
    return jax.vmap(update)(params_C, state_C, x_CxBxN, keep_CxBxKxM), None

  (params_C, _), _ = jax.lax.scan(step, (params_C, state_C), jnp.arange(steps))
  return params_C


def layer_metrics(W_MxN, x_BxN, loss):
  """Returns the one-layer metrics (see the module docstring) for weights W and held-out inputs x."""
  norm_N = jnp.linalg.norm(W_MxN, axis=0)
  rep_N = norm_N > REPRESENTED
  overlap_NxN = (W_MxN / jnp.maximum(norm_N, 1e-9)).T @ W_MxN  # [i, j] = Ŵ_i · W_j
  pair_NxN = rep_N[:, None] & rep_N[None, :] & ~jnp.eye(N_FEATURES, dtype=bool)
  h_BxM = x_BxN @ W_MxN.T
  c_BxM = h_BxM - h_BxM.mean(axis=0)
  kurt_M = jnp.mean(c_BxM ** 4, axis=0) / jnp.maximum(jnp.mean(c_BxM ** 2, axis=0) ** 2, 1e-20)
  return {"n_represented": rep_N.sum().astype(jnp.float32), "norm2": jnp.sum(norm_N ** 2),
          "interference": jnp.sum(jnp.where(pair_NxN, overlap_NxN ** 2, 0.0)), "kurtosis": kurt_M.mean(),
          "loss": loss, "feature_norm": norm_N}


def cell_metrics(params, x_BxN):
  """Returns every metric of one cell's trained models on held-out inputs x (no dropout)."""
  out_BxKxN = block_outputs(params["W_KxMxN"], params["b_KxN"], x_BxN)
  out = layer_metrics(params["W_KxMxN"][0], x_BxN, weighted_mse(out_BxKxN[:, 0], x_BxN))
  full = weighted_mse(out_BxKxN[:, 1] + out_BxKxN[:, 2], x_BxN)
  ablated_K = jnp.stack([weighted_mse(out_BxKxN[:, b], x_BxN) for b in (2, 1)])  # block 1, then 2, removed
  rep_KxN = jnp.linalg.norm(params["W_KxMxN"][1:], axis=1) > REPRESENTED
  out.update(res_loss=full, res_damage=ablated_K.mean() - full,
             res_shared=jnp.sum(rep_KxN[0] & rep_KxN[1]).astype(jnp.float32),
             res_represented=jnp.sum(rep_KxN[0] | rep_KxN[1]).astype(jnp.float32))
  return out


@functools.lru_cache(maxsize=None)
def sweep_fn(steps: int, eval_n: int):
  """Returns the jitted keys_S -> {metric: [S, C, ...]} over every cell and seed (one compile)."""
  def one_seed(key, sparsity_C, dropout_C):
    params_C = train(key, sparsity_C, dropout_C, steps)
    x_CxBxN = sample_x(jax.random.fold_in(key, 10**6), sparsity_C, eval_n)
    return jax.vmap(cell_metrics)(params_C, x_CxBxN)
  return jax.jit(jax.vmap(one_seed, in_axes=(0, None, None)))


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", QUICK_STEPS if quick else STEPS)
  eval_n = smoke.get("eval_n", EVAL_N)
  sparsity_C = jnp.array([s for s, _ in CELLS])
  dropout_C = jnp.array([p for _, p in CELLS])
  t0 = time.perf_counter()
  out_S = jax.device_get(sweep_fn(steps, eval_n)(harness.seed_keys(key, seeds), sparsity_C, dropout_C))
  seconds = time.perf_counter() - t0
  data = {arm: {m: np.asarray(v)[:, c] for m, v in out_S.items()} for c, arm in enumerate(ARMS)}
  cfg = {"n_features": N_FEATURES, "m_hidden": M_HIDDEN, "importance": "0.7^i", "sparsities": SPARSITIES,
         "dropouts": DROPOUTS, "steps": steps, "batch": BATCH,
         "optimizer": f"optax.adam(lr {LR:g} for 3/4 of the steps, then linear decay to 0)",
         "eval_n": eval_n, "represented_threshold": REPRESENTED, "cells_and_seeds_one_jit": True,
         "train_and_eval_s": seconds}
  notes = [_represented_note(data), _residual_note(data)]
  return harness.Outcome(data=data, config=cfg, notes=notes)


def _iqm(x):
  return float(harness.stats.iqm(x))


def _represented_note(data) -> str:
  rows = []
  for s in SPARSITIES:
    rows.append(f"S={s:g}: " + ", ".join(
        f"p={p:g} {_iqm(data[arm_name(s, p)]['n_represented']):.1f}/{_iqm(data[arm_name(s, p)]['res_shared']):.1f}"
        for p in DROPOUTS))
  return ("Features represented by the layer (‖W_i‖ > 0.5) / shared by both residual blocks, IQM over seeds: "
          + "; ".join(rows))


def _residual_note(data) -> str:
  rows = []
  for s in SPARSITIES:
    cells = []
    for p in DROPOUTS:
      d = data[arm_name(s, p)]
      cells.append(f"p={p:g} {_iqm(d['res_loss']):.3g}/{_iqm(d['res_damage']):.3g}/"
                   f"{_iqm(d['res_loss'] + d['res_damage']):.3g}")
    rows.append(f"S={s:g}: " + ", ".join(cells))
  return ("Two-block model: loss with both blocks / loss increase from ablating one (mean over the two blocks) / "
          "loss with one block ablated, IQM over seeds: " + "; ".join(rows))


def _interpret(analysis, data):
  """Lists the cells (every S, p > 0) where dropout does not lower interference ≥ 20% or ablation damage."""
  interf, damage = [], []
  for s in SPARSITIES:
    for p in DROPOUTS[1:]:
      arm, base = arm_name(s, p), arm_name(s, 0.0)
      i0, i1 = _iqm(data[base]["interference"]), _iqm(data[arm]["interference"])
      ratio = i1 / i0 if i0 > 0 else float("nan")
      if not ratio <= 0.8:
        interf.append(f"S={s:g} p={p:g} (ratio {ratio:.2f}, {i1:.3g} vs {i0:.3g})")
      d = _iqm(data[arm]["res_damage"]) - _iqm(data[base]["res_damage"])
      if not d < 0:
        damage.append(f"S={s:g} p={p:g} (Δdamage {d:+.3g})")
  return ["Cells where interference is not ≥ 20% lower with dropout (IQM point estimates): "
          + ("; ".join(interf) or "none"),
          "Cells where ablation damage is not smaller with dropout (IQM point estimates): "
          + ("; ".join(damage) or "none")]


def plot(fig, data, analysis):
  del analysis
  axes = fig.subplots(1, 4)
  panels = [("n_represented", "features represented"), ("interference", "interference (represented)"),
            ("kurtosis", "hidden kurtosis"), ("res_damage", "2-block ablation damage")]
  x = np.arange(len(SPARSITIES))
  for ax, (metric, title) in zip(axes, panels):
    for p in DROPOUTS:
      y = [_iqm(data[arm_name(s, p)][metric]) for s in SPARSITIES]
      ax.plot(x, y, marker="o", label=f"dropout {p:g}")
    ax.set_xticks(x, [f"{s:g}" for s in SPARSITIES])
    ax.set_xlabel("sparsity S")
    ax.set_title(title)
    if metric == "kurtosis":
      ax.set_yscale("log")
    elif metric != "n_represented":
      ax.set_yscale("symlog", linthresh=1e-3)
      ax.set_ylim(bottom=0.0)
  axes[0].axhline(M_HIDDEN, color="grey", lw=0.8, ls="--")
  axes[0].legend()


def _criteria():
  out = []
  for s in HIGH:
    out.append(harness.Criterion(
        arm=arm_name(s, 0.3), baseline=arm_name(s, 0.0), metric="interference", statistic="iqm_ratio",
        threshold=0.8, direction="less",
        description=f"S={s:g}: interference with dropout .3 is ≥ 20% lower than without"))
  for s in HIGH:
    out.append(harness.Criterion(
        arm=arm_name(s, 0.3), baseline=arm_name(s, 0.0), metric="res_damage", statistic="iqm_diff",
        threshold=0.0, direction="less",
        description=f"S={s:g}: ablating one residual block costs less loss with dropout .3 than without"))
  return out


def _effects():
  out = []
  for s in SPARSITIES:
    for p in DROPOUTS[1:]:
      out.append(harness.Effect(arm=arm_name(s, p), baseline=arm_name(s, 0.0), metric="interference",
                                statistic="iqm_ratio"))
  for s in HIGH:
    out += [harness.Effect(arm=arm_name(s, 0.1), baseline=arm_name(s, 0.0), metric="res_damage",
                           statistic="iqm_diff"),
            harness.Effect(arm=arm_name(s, 0.3), baseline=arm_name(s, 0.0), metric="n_represented",
                           statistic="iqm_diff"),
            harness.Effect(arm=arm_name(s, 0.3), baseline=arm_name(s, 0.0), metric="norm2", statistic="iqm_diff"),
            harness.Effect(arm=arm_name(s, 0.3), baseline=arm_name(s, 0.0), metric="kurtosis",
                           statistic="iqm_diff"),
            harness.Effect(arm=arm_name(s, 0.3), baseline=arm_name(s, 0.0), metric="res_shared",
                           statistic="iqm_diff"),
            harness.Effect(arm=arm_name(s, 0.3), baseline=arm_name(s, 0.0), metric="loss", statistic="iqm_diff"),
            harness.Effect(arm=arm_name(s, 0.0), metric="res_damage", statistic="iqm")]
  return out


SIMULATION = harness.Simulation(
    name="x9_dropout_superposition",
    question="In Elhage et al.'s toy model of superposition, does dropout on the hidden layer lower the "
             "interference between the features a layer represents, and does it make two residual blocks "
             "more redundant (ablating one costs less)?",
    prediction="dropout reduces superposition in a layer and raises redundancy across layers",
    setup="Toy model of superposition (Elhage et al. 2022): n=20 features, m=5 hidden dims, importance 0.7^i, "
          "features present with probability 1−S, S ∈ {0, .7, .9, .99}; ReLU output model x' = ReLU(WᵀWx + b) "
          "with inverted dropout p ∈ {0, .1, .3} on h = Wx during training; a two-block residual version sums two "
          "such blocks' outputs into the stream (see the module docstring); importance-weighted MSE, optax.adam "
          f"(lr {LR:g} for 3/4 of the steps, then linear decay to 0), batch {BATCH}, {STEPS} steps ({QUICK_STEPS} "
          "under --quick); all 12 cells × seeds in one jitted vmapped function; metrics on held-out inputs without "
          "dropout.",
    arms={arm_name(s, p): f"sparsity {s:g}, dropout {p:g} (one layer and the two-block residual model)"
          for s, p in CELLS},
    criteria=_criteria(),
    controls=[
        harness.Control(kind="positive", arm=arm_name(0.99, 0.0), metric="n_represented", statistic="iqm",
                        threshold=M_HIDDEN + 1, direction="greater",
                        description="S=.99 without dropout: the layer represents more features than it has "
                                    "dimensions (superposition, Elhage et al.'s known result)"),
        harness.Control(kind="negative", arm=arm_name(0.0, 0.0), metric="n_represented", statistic="iqm",
                        threshold=M_HIDDEN, direction="less",
                        description="S=0 (dense inputs) without dropout: at most m features represented, "
                                    "no superposition"),
    ],
    effects=_effects(),
    interpret=_interpret,
    plot=plot,
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=23,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
