"""S1: does coarse (channel- or tensor-wise) gradient scaling find flatter minima than AdamW?

Each seed's cached base model (`sims.world.pretrain`, Qwen3-style) is fine-tuned with the project's
ORPO objective and full-backprop train step (`sims.engine`, the suite's shared program) on diverse
behaviour preference pairs (no replay) by four optimizers: optax.sgd, optax.adamw, the project's
APOLLO (rank 8, channel-wise scaling) and APOLLO-Mini (rank 1, tensor-wise scaling). Each
optimizer's lr gives the same per-step relative update ||Δθ||/||θ|| at the base (probe run below),
and every run stops at a matched train loss: the first step at which the ORPO loss on the fixed
batch of HESS_N training pairs where the curvature is measured reaches LOSS_TARGET (or at
MAX_STEPS). A positive-control arm runs SGD at EOS_MULT × the matched SGD lr: its stability edge
2/η then lies below the λ_max that matched SGD settles at, and gradient descent cannot stay where
λ_max > 2/η, so it must end flatter (Cohen et al. 2021, "Gradient Descent on Neural Networks
Typically Occurs at the Edge of Stability"; Lewkowycz et al. 2020, the catapult phase).

Metrics, per seed (H = Hessian of the ORPO loss L on a fixed batch of HESS_N training pairs):
  lambda_max      = the largest eigenvalue of H at the stopped params, by power iteration on
                    Hessian-vector products Hv = jvp(grad L)(θ; v): pass 1 gives the dominant
                    μ = argmax |λ|; pass 2 iterates H − μI, whose dominant ν gives λ_max = μ + ν
                    when μ < 0 (when μ > 0, λ_max = μ). POWER_ITERS iterations per pass.
  update_sharpness = uᵀHu / uᵀu for u = θ_T − θ_{T−1}, the optimizer's last update before it
                    stopped (its own preconditioning; Pan & Li 2022's directional sharpness)
  forgetting_k    = acc_k(base) − acc_k(final) in pp for the skills k ∈ (qa, arith, fact); [S, 3]
  train_loss      = L at the stopped params (reported to show the losses are matched)
  steps           = steps taken to reach the target; reached = 1 if the target was reached
  flatter_than_adamw (apollo, apollo_mini) = 1 if λ_max(arm) < λ_max(adamw) on that seed, else 0
  flatter_than_sgd (sgd_eos) = 1 if λ_max(sgd_eos) < λ_max(sgd) on that seed, else 0
The sharpness–forgetting correlation (Spearman and Pearson, across seeds × the four optimizers)
is a computed note.
"""

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamjax.train import step as step_lib
from sims import engine
from sims import harness
from sims import world as W

TARGET_REL = 2e-3  # per-step ||Δθ||/||θ|| of every optimizer at the base (≈ lr 4e-5 on a 7B model)
LOSS_TARGET = 0.5  # ORPO loss on the Hessian batch at which every run stops
MAX_STEPS, QUICK_MAX_STEPS = 160, 80
PROBE_LR = {"sgd": 1e-1, "adamw": 1e-3, "apollo": 1e-3, "apollo_mini": 1e-3}
PROBE_STEPS = 8
EOS_MULT = 8.0  # the control's SGD lr = EOS_MULT × the matched SGD lr (its 2/η edge 8× lower)
HESS_N, POWER_ITERS, QUICK_POWER_ITERS = 64, 15, 10
BATCH = W.BATCH
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}

OPTIMIZERS = ("sgd", "adamw", "apollo", "apollo_mini")
ARMS = {"sgd": ("sgd", "lr"), "adamw": ("adamw", "lr"), "apollo": ("apollo", "lr"),
        "apollo_mini": ("apollo_mini", "lr"), "sgd_eos": ("sgd", "eos")}


def orpo_loss(params, batch, config):
  """Returns the project's ORPO batch loss (full backprop), the loss every arm trains."""
  return step_lib.batch_loss(params, batch, config=config, objective="orpo", gradient_mode="full")[0]


@functools.lru_cache(maxsize=None)
def _loss_fn(config):
  """Returns jit: (params [S], batch) → the ORPO loss of every seed on the batch [S]."""
  return jax.jit(jax.vmap(lambda p, b: orpo_loss(p, b, config), in_axes=(0, None)))


@jax.jit
def _advance(active_S, new: engine.State, old: engine.State, update):
  """Returns (state, last update Δθ) per seed: after the step where the seed is active, else as before."""
  keep = lambda n, o: jnp.where(active_S.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  step = jax.tree.map(jnp.subtract, new.train.params, old.train.params)
  return jax.tree.map(keep, new, old), jax.tree.map(keep, step, update)


def train_seeds(config, optimizer, base_S, keys_S, pool, hess_batch, *, lr, target, max_steps):
  """Returns every seed's run to a loss target: {'params', 'update', 'steps', 'reached', 'stop_loss', 'rel_update'}.

  Step i trains on `world.sample_batch` rows drawn with fold_in(key, i), one step per call of the suite's
  shared fine-tuning program (`sims.engine`: optimizer and lr traced); after each step a seed's ORPO
  loss on hess_batch is evaluated and the seed stops (its state kept) once it is ≤ target, or after
  max_steps. `update` is each seed's last step's Δθ, `rel_update` its mean per-step ||Δθ|| / ||θ||.
  """
  idx = engine.sample_indices(keys_S, pool.context_BxC.shape[0], BATCH)
  settings = engine.arm(1, lr, optimizer=optimizer)
  loss_fn = _loss_fn(config)
  s = keys_S.shape[0]
  state, update = engine.init(base_S), jax.tree.map(jnp.zeros_like, base_S)
  steps, reached = np.zeros(s, np.int32), np.zeros(s, bool)
  stop_loss, rel = np.full(s, np.inf, np.float32), np.zeros(s, np.float32)
  for i in range(max_steps):
    active = ~reached
    if not active.any():
      break
    res = engine.run(config, state, pool, idx[:, i:], settings)
    loss = np.asarray(loss_fn(res.params, hess_batch))
    state, update = _advance(active, res.state, state, update)
    steps = np.where(active, steps + 1, steps)
    reached = np.where(active, loss <= target, reached)
    stop_loss = np.where(active, loss, stop_loss)
    rel = np.where(active, rel + res.update_norm[:, 0] / res.param_norm[:, 0], rel)
  return {"params": state.train.params, "update": update, "steps": steps, "reached": reached, "stop_loss": stop_loss,
          "rel_update": rel / np.maximum(steps, 1).astype(np.float32)}


def _unit(v):
  n = optax.tree.norm(v)
  return jax.tree.map(lambda x: x / jnp.maximum(n, 1e-30), v)


def _random_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  ks = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(ks, leaves)])


def power_iteration(hvp, v0, iters: int, shift=0.0, first=None):
  """Returns (Rayleigh quotient of the last iterate under H − shift·I, of `first` under H).

  One Hessian-vector product per iteration: iteration 0 reads `first` (when given) instead of the
  iterate, so a further quadratic form costs no extra HVP call site (compilation) and one HVP.
  """
  first = _unit(v0 if first is None else first)

  def body(i, c):
    v, rq, q0 = c
    x = jax.tree.map(lambda a, b: jnp.where(i == 0, a, b), first, v)
    hx = jax.tree.map(lambda h, y: h - shift * y, hvp(x), x)
    q = optax.tree.vdot(x, hx)
    nxt = jax.tree.map(lambda a, b: jnp.where(i == 0, a, b), v, _unit(hx))
    return nxt, q, jnp.where(i == 0, q + shift, q0)

  _, rq, q0 = jax.lax.fori_loop(0, iters + 1, body, (_unit(v0), jnp.float32(0.0), jnp.float32(0.0)))
  return rq, q0


def top_eigenvalue_S(hvp, args_S, v0_S, first_S, iters: int):
  """Returns (λ_max [S], dominant eigenvalue μ [S], Rayleigh quotient of first_S under H [S]).

  hvp(args, v) is one seed's Hessian-vector product; args_S, v0_S and first_S carry a leading seed
  axis. Pass 1 power-iterates H from v0 (its first HVP reads `first`): μ = argmax |λ|. When some
  seed's μ ≤ 0, pass 2 iterates H − μI from v0, whose dominant eigenvalue ν ≤ 0 gives
  λ_max = μ + ν; where μ > 0, λ_max = μ. Both passes are one `while_loop` around one vmapped
  `power_iteration` (shift and start traced), so the HVP is compiled once.
  """

  def run(args, v0, first, shift, second):
    start = jax.tree.map(lambda a, b: jnp.where(second, b, a), first, v0)
    return power_iteration(lambda v: hvp(args, v), v0, iters, shift=shift, first=start)

  def body(c):
    p, mu, ush, nu = c
    second = p == 1
    rq, q0 = jax.vmap(run, in_axes=(0, 0, 0, 0, None))(args_S, v0_S, first_S, jnp.where(second, mu, 0.0),
                                                       second)
    return p + 1, jnp.where(second, mu, rq), jnp.where(second, ush, q0), jnp.where(second, rq, nu)

  def cond(c):
    p, mu = c[0], c[1]
    return (p == 0) | ((p == 1) & ~jnp.all(mu > 0))

  zeros = jnp.zeros(jax.tree.leaves(v0_S)[0].shape[:1], jnp.float32)
  _, mu, ush, nu = jax.lax.while_loop(cond, body, (jnp.int32(0), zeros, zeros, zeros))
  return jnp.where(mu > 0, mu, mu + nu), mu, ush


@functools.lru_cache(maxsize=None)
def _curvature_fn(config, iters: int):
  """Returns jit(f): per seed λ_max, the update's directional sharpness and the loss on a batch.

  `top_eigenvalue_S` on the ORPO loss's Hessian: pass 1 (preceded by the update's quadratic form)
  for every seed, the shifted pass 2 only when some seed's dominant eigenvalue μ is negative.
  """

  def f(params_S, update_S, keys_S, batch):
    loss = lambda p: orpo_loss(p, batch, config)

    def hvp(params, v):
      return jax.jvp(jax.grad(loss), (params,), (v,))[1]

    v0_S = jax.vmap(_random_like)(keys_S, params_S)
    lam_S, mu_S, ush_S = top_eigenvalue_S(hvp, params_S, v0_S, update_S, iters)
    return {"lambda_max": lam_S, "lambda_dominant": mu_S, "update_sharpness": ush_S,
            "train_loss": jax.vmap(loss)(params_S)}

  return jax.jit(f)


def probe_lr(config, optimizer, base_S, keys_S, pool, hess_batch, steps: int) -> dict:
  """Returns the lr whose mean per-step ||Δθ||/||θ|| over `steps` steps from the base is TARGET_REL.

  `world.lr_for`'s rule (Adam-type and SGD updates are ∝ lr), run with this module's own
  compiled train function (target loss −∞) so the probe costs no extra compilation.
  """
  out = train_seeds(config, optimizer, base_S, keys_S, pool, hess_batch, lr=PROBE_LR[optimizer],
                    target=-np.inf, max_steps=steps)
  measured = float(np.mean(np.asarray(out["rel_update"])))
  return {"probe_lr": PROBE_LR[optimizer], "probe_steps": steps, "probe_rel_update": measured,
          "lr": PROBE_LR[optimizer] * TARGET_REL / measured, "target_rel_update": TARGET_REL,
          "real_lr_equivalent": W.real_lr_equivalent(TARGET_REL)}


def _ranks(x):
  return np.argsort(np.argsort(x)).astype(np.float64)


def correlations(x, y) -> tuple[float, float]:
  """Returns (Spearman ρ, Pearson r) of two 1-D samples (ranks without tie correction)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1]), float(np.corrcoef(x, y)[0, 1])


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  max_steps = smoke.get("steps", QUICK_MAX_STEPS if quick else MAX_STEPS)
  probe_steps = min(PROBE_STEPS, max_steps)
  iters = 2 if smoke else (QUICK_POWER_ITERS if quick else POWER_ITERS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  sets = W.eval_sets(world, n=smoke.get("eval_n", 256))
  acc_base = W.accuracies(base_S, sets, config)
  pool = W.collate(W.examples("behaviour", 1024, np.random.default_rng(7), world, preference=True))
  hess_batch = jax.tree.map(lambda x: x[:HESS_N], pool)
  keys_S = harness.seed_keys(key, seeds)
  curv_keys_S = jax.vmap(lambda k: jax.random.fold_in(k, 99))(keys_S)
  curvature = _curvature_fn(config, iters)
  timing = collections.defaultdict(float)
  t0 = time.perf_counter()
  lrs = {name: probe_lr(config, name, base_S, keys_S, pool, hess_batch, probe_steps) for name in OPTIMIZERS}
  timing["probe_and_compile_s"] = time.perf_counter() - t0
  lrs["sgd_eos"] = {"lr": EOS_MULT * lrs["sgd"]["lr"], "rule": f"{EOS_MULT:g} × the matched SGD lr",
                    "stability_edge_2_over_lr": 2.0 / (EOS_MULT * lrs["sgd"]["lr"])}

  out, raw = {}, {}
  for arm, (name, which) in ARMS.items():
    lr = lrs[arm if which == "eos" else name]["lr"]
    t0 = time.perf_counter()
    res = jax.block_until_ready(train_seeds(config, name, base_S, keys_S, pool, hess_batch, lr=lr,
                                            target=LOSS_TARGET, max_steps=max_steps))
    t1 = time.perf_counter()
    curv = jax.block_until_ready(curvature(res["params"], res["update"], curv_keys_S, hess_batch))
    timing["train_s"] += t1 - t0
    timing["curvature_s"] += time.perf_counter() - t1
    acc = W.accuracies(res["params"], sets, config)
    raw[arm] = {k: np.asarray(v) for k, v in curv.items()}
    out[arm] = {
        "lambda_max": raw[arm]["lambda_max"],
        "update_sharpness": raw[arm]["update_sharpness"],
        "forgetting": np.stack([np.asarray(acc_base[k] - acc[k]) for k in W.SKILLS], axis=1),
        "train_loss": raw[arm]["train_loss"],
        "steps": np.asarray(res["steps"], np.float64),
        "reached": np.asarray(res["reached"], np.float64),
        "behaviour": np.asarray(acc["behaviour"]),
    }
  for arm in ("apollo", "apollo_mini"):
    out[arm]["flatter_than_adamw"] = (out[arm]["lambda_max"] < out["adamw"]["lambda_max"]).astype(np.float64)
  out["sgd_eos"]["flatter_than_sgd"] = (out["sgd_eos"]["lambda_max"] < out["sgd"]["lambda_max"]).astype(np.float64)

  notes = [f"lr per optimizer (per-step ||Δθ||/||θ|| {TARGET_REL:g} at the base): " + ", ".join(
      f"{n} {lrs[n]['lr']:.3g}" for n in OPTIMIZERS)
      + f"; control sgd_eos lr {lrs['sgd_eos']['lr']:.3g} = {EOS_MULT:g} × SGD's, stability edge 2/η = "
        f"{lrs['sgd_eos']['stability_edge_2_over_lr']:.4g} vs λ_max reached by sgd (IQM) "
        f"{harness.stats.iqm(out['sgd']['lambda_max']):.4g} and sgd_eos "
        f"{harness.stats.iqm(out['sgd_eos']['lambda_max']):.4g}"]
  notes.append(f"matched loss (target {LOSS_TARGET:g} on the {HESS_N} Hessian pairs): " + "; ".join(
      f"{a} loss {np.mean(out[a]['train_loss']):.3f}, reached {int(out[a]['reached'].sum())}/{seeds} "
      f"in {np.mean(out[a]['steps']):.0f} steps" for a in ARMS))
  notes += sharpness_forgetting_notes(out)
  config_out = {"max_steps": max_steps, "loss_target": LOSS_TARGET, "batch_size": BATCH,
                "hess_n": HESS_N, "power_iters": iters, "objective": "orpo", "gradient_mode": "full",
                "lrs": lrs, "base": base_info, "model": str(config), "seeds_vmapped": True,
                "lambda_dominant": {a: raw[a]["lambda_dominant"] for a in ARMS}, "timing": dict(timing)}
  return harness.Outcome(data=out, config=config_out, notes=notes)


def sharpness_forgetting_notes(out) -> list[str]:
  """Returns computed notes on whether sharpness tracks forgetting across seeds × optimizers."""
  lam = np.concatenate([out[a]["lambda_max"] for a in OPTIMIZERS])
  ush = np.concatenate([out[a]["update_sharpness"] for a in OPTIMIZERS])
  forg = np.concatenate([out[a]["forgetting"].mean(axis=1) for a in OPTIMIZERS])
  notes = []
  for label, x in (("λ_max", lam), ("update sharpness", ush)):
    if np.std(x) == 0 or np.std(forg) == 0 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(forg))):
      notes.append(f"{label} vs forgetting: correlation undefined (a constant or non-finite sample)")
      continue
    rho, r = correlations(x, forg)
    verdict = ("sharper runs forgot more" if rho >= 0.3 else
               "flatter runs forgot more: sharpness does not track forgetting here" if rho <= -0.3 else
               "sharpness does not track forgetting here (|ρ| < 0.3)")
    notes.append(f"{label} vs forgetting (mean over skills), {len(x)} runs = seeds × {len(OPTIMIZERS)} "
                 f"optimizers: Spearman ρ = {rho:.2f}, Pearson r = {r:.2f}; {verdict} (forgetting ranges "
                 f"{forg.min():.2f} to {forg.max():.2f} pp; {label} {x.min():.3g} to {x.max():.3g})")
  return notes


SIMULATION = harness.Simulation(
    name="s1_apollo_flatness",
    question="At a matched train loss and a matched update size, does APOLLO's coarse (channel- or "
             "tensor-wise) gradient scaling end in flatter minima (smaller top Hessian eigenvalue) "
             "than AdamW's per-coordinate scaling, and does flatness go with less forgetting?",
    prediction="coarse scaling finds flatter minima",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed; ORPO "
          "(full backprop) on diverse behaviour preference pairs, no replay; SGD, AdamW, APOLLO "
          "(rank 8) and APOLLO-Mini (rank 1, tensor scaling) with lrs giving the same per-step "
          "||Δθ||/||θ|| = 2e-3 at the base; each run stops when the ORPO loss on 64 fixed training "
          f"pairs reaches 0.5 (at most {MAX_STEPS} steps of batch 32; quick {QUICK_MAX_STEPS}). Hessian of the ORPO loss on those 64 "
          "pairs; λ_max by (shifted) power iteration on Hessian-vector products.",
    arms={"sgd": "optax.sgd at the matched update size",
          "adamw": "optax.adamw (no weight decay) at the matched update size",
          "apollo": "dreamjax.optim.apollo (rank 8, channel-wise scaling) at the matched update size",
          "apollo_mini": "dreamjax.optim.apollo_mini (rank 1, tensor-wise scaling) at the matched update size",
          "sgd_eos": "optax.sgd at 8 × the matched SGD lr, stability edge 2/η below matched SGD's λ_max "
                     "(positive control: must end flatter than sgd)"},
    criteria=[
        harness.Criterion(arm="apollo", metric="flatter_than_adamw", statistic="mean", threshold=0.8,
                          direction="greater",
                          description="APOLLO's λ_max < AdamW's on ≥ 80% of seeds (per-seed indicator, "
                                      "mean; the bootstrap CI's lower end must reach 0.8)"),
        harness.Criterion(arm="apollo_mini", metric="flatter_than_adamw", statistic="mean", threshold=0.8,
                          direction="greater",
                          description="APOLLO-Mini's λ_max < AdamW's on ≥ 80% of seeds (per-seed "
                                      "indicator, mean)"),
    ],
    controls=[
        harness.Control(kind="positive", arm="sgd_eos", metric="flatter_than_sgd", statistic="mean",
                        threshold=0.8, direction="greater",
                        description="SGD past the stability edge ends flatter than SGD at the matched "
                                    "update size on ≥ 80% of seeds (the measurement sees flatness)"),
    ],
    effects=[
        harness.Effect(arm="apollo", metric="lambda_max", statistic="iqm_ratio", baseline="adamw"),
        harness.Effect(arm="apollo_mini", metric="lambda_max", statistic="iqm_ratio", baseline="adamw"),
        harness.Effect(arm="sgd", metric="lambda_max", statistic="iqm_ratio", baseline="adamw"),
        harness.Effect(arm="apollo", metric="update_sharpness", statistic="iqm_ratio", baseline="adamw"),
        harness.Effect(arm="apollo_mini", metric="update_sharpness", statistic="iqm_ratio", baseline="adamw"),
        harness.Effect(arm="apollo", metric="forgetting", statistic="iqm_diff", baseline="adamw"),
        harness.Effect(arm="apollo_mini", metric="forgetting", statistic="iqm_diff", baseline="adamw"),
        harness.Effect(arm="apollo", metric="train_loss", statistic="iqm_diff", baseline="adamw",
                       label="matched loss: IQM(apollo.train_loss) − IQM(adamw.train_loss)"),
        harness.Effect(arm="apollo_mini", metric="train_loss", statistic="iqm_diff", baseline="adamw",
                       label="matched loss: IQM(apollo_mini.train_loss) − IQM(adamw.train_loss)"),
    ],
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=201,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
