"""X10: per-layer training-health diagnostics catch a degenerate run and spare healthy and untrained ones.

Each seed's cached Qwen3-style base is fine-tuned with the project's ORPO objective (full backprop)
and APOLLO on diverse behaviour preference pairs for CHUNKS "epochs" of equal length, at per-step
update sizes ||Δθ||/||θ|| (`world.lr_for`) that are healthy (5e-4, 2e-3) or destructive (5e-2); a
random-init model (not pretrained) trained at 2e-3 is the untrained control. s4_small_steps_monitor
tests the project's default Guard (perplexity, weight drift, residual growth) on such runs; this
simulation tests three per-layer figures read from the training itself, which need no held-out
perplexity:

  residual growth   g_l(c) = `monitor.residual_growth` (token mean of ||h_{l+1}|| / ||h_l||) on 64
                    held-out general examples after chunk c; R(c) = max_l g_l(c) / g_l(0)
                    (`monitor.growth_vs_base`, the run's own start as the base). Alarm: the project's
                    `Guard` with only its residual check on, GuardConfig().max_residual_growth_vs_base.
  gradient floor    n_l(t) = ||∇_l L_t|| per decoder layer (`monitor.layer_grad_norms`) of the training
                    batch's loss; F(c) = min_l mean_{t ∈ c} n_l(t) / n_l(0). Alarm: F(c) < GRAD_FLOOR
                    (a layer's gradient fell a hundredfold: it stopped learning).
  direction         cos_l(t) = <∇_l L_t, ∇_l L_{t−1}> / (||∇_l L_t|| ||∇_l L_{t−1}||), consecutive steps'
                    gradients of consecutive batches; D(c) = min_l mean_{t ∈ c} cos_l(t) (t ≥ 1).
                    Alarm: D(c) < DIRECTION_FLOOR (consecutive steps point against each other on
                    average: the steps overshoot).

Training is the suite's shared fine-tuning program (`sims.engine`: the project's train step, which
also reports per step each layer's gradient norm and the cosine with the previous step's gradient),
one call per chunk, seeds vmapped; the residual growth and the capability are evaluated after each.

Per-seed metrics (chunks c = 1..C; C + 1 = never):
  fired / fire_chunk    any diagnostic alarms at some chunk / the first such chunk
  fired_residual, fired_floor, fired_direction   the same per diagnostic
  cap_loss, half_chunk, early, loss_frac_at_fire  capability (mean exact match over qa, arith, fact)
                        loss and timing, as in s4_small_steps_monitor (`timing_metrics`)
  worst_residual = max_c R(c);  worst_floor = −log10 min_c F(c);  worst_direction = −min_c D(c)
                        (higher = worse, so an alarm is worst > its limit in these units)
  separation.gap_<d> = min over degenerate arms − max over healthy arms of worst_<d> on the seed:
                        > 0 when the diagnostic ranks every degenerate run above every healthy one
"""

import functools
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.model import init_params
from dreamjax.train import diagnostics as diag_lib
from dreamjax.train import evaluation
from dreamjax.train import guard as guard_lib
from sims import engine
from sims import harness
from sims import world as W
from sims.s4_small_steps_monitor import timing_metrics

CHUNKS = 10
GRAD_FLOOR = 0.01  # alarm when a layer's chunk-mean gradient norm < 1% of its first-step norm
DIRECTION_FLOOR = 0.0  # alarm when a layer's chunk-mean consecutive-gradient cosine < 0
# arm -> (start, per-step ||Δθ||/||θ|| target, kind)
ARMS = {"healthy_5e-4": ("base", 5e-4, "healthy"), "healthy_2e-3": ("base", 2e-3, "healthy"),
        "destructive_5e-2": ("base", 5e-2, "degenerate"), "random_init": ("random", 2e-3, "untrained")}
DIAGNOSTICS = ("residual", "floor", "direction")
EVAL_GENERAL, EVAL_SKILL = 64, 128  # held-out general examples for residual growth; per skill for capability
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


@functools.lru_cache(maxsize=None)
def _health_fn(config):
  """Returns jit: (params [S], general batch, skills batch) → (residual growth [S, L], capability % [S])."""
  names = [diag_lib.layer_name(i, config.num_layers) for i in range(config.num_layers)]

  def health(p, general, skills):
    tokens, mask = evaluation.general_inputs(general)
    res = diag_lib.residual_growth(p, tokens, mask, config)
    growth_L = jnp.stack([res[f"residual_growth/{n}"] for n in names])
    cap = jnp.mean(W.exact_match_B(jnp.argmax(W.response_logits(p, skills, config), -1), skills)) * 100.0
    return growth_L, cap

  return jax.jit(jax.vmap(health, in_axes=(0, None, None)))


def train_arm(config, start_S, keys_S, pool, lr: float, general, skills, chunks: int, chunk_steps: int):
  """Returns per-step figures (loss [S, C, T], grad norm [S, C, T, L], grad cosine [S, C, T, L]) and
  per-chunk figures (residual growth [S, C + 1, L], capability [S, C + 1]; index 0 = the start).

  APOLLO fine-tuning on `world.sample_batch` draws (step i: fold_in(key, i)): one call of the suite's
  shared fine-tuning program (`sims.engine`, which reports the per-layer gradient norms and each
  gradient's cosine with the previous step's) per chunk, each continuing the previous chunk's state.
  """
  health = _health_fn(config)
  idx = engine.sample_indices(keys_S, pool.context_BxC.shape[0], W.BATCH)
  state, per_step, per_chunk = engine.init(start_S), [], [health(start_S, general, skills)]
  for c in range(chunks):
    res = engine.run(config, state, pool, idx[:, c * chunk_steps:], engine.arm(chunk_steps, lr))
    state = res.state
    per_step.append(tuple(x[:, :chunk_steps] for x in (res.loss, res.grad_norm, res.grad_cos)))
    per_chunk.append(health(res.params, general, skills))
  return engine.stack(per_step, axis=1), engine.stack(per_chunk, axis=1)


def held_out(world: W.World, smoke: dict):
  """Returns (general batch for residual growth, skills batch for capability): never trained on."""
  rng = np.random.default_rng(41)
  n_gen, n_skill = smoke.get("eval_n", EVAL_GENERAL), smoke.get("eval_n", EVAL_SKILL)
  general = [W.GENERATORS[W.SKILLS[i % 3]](rng, world) for i in range(n_gen)]
  skills = [ex for k in W.SKILLS for ex in W.examples(k, n_skill, rng, world)]
  return W.collate(general), W.collate(skills)


def residual_alarms(growth_CxL, names) -> tuple[np.ndarray, np.ndarray]:
  """Returns (R(c) [C], alarm [C]): the project's growth_vs_base and a Guard with only that check on."""
  cfg = guard_lib.GuardConfig(max_perplexity_ratio=None, max_weight_drift=None, max_residual_growth=None,
                        max_chosen_logp_fall=None, min_chosen_logp_slope=None)
  guard = guard_lib.Guard("unused", cfg, is_main_process=False)  # decisions only, no log file
  fig = lambda g_L: {f"residual_growth/{n}": float(v) for n, v in zip(names, g_L)}
  base = fig(growth_CxL[0])
  ratio, alarm = [], []
  for c in range(1, growth_CxL.shape[0]):
    figures = diag_lib.growth_vs_base(fig(growth_CxL[c]), base)
    ratio.append(figures["residual_growth/max_vs_base"])
    alarm.append(guard.decide(c, figures).action == "abort")
  return np.asarray(ratio), np.asarray(alarm)


def diagnostics(norm_CxTxL, cos_CxTxL, growth_CxL, names) -> dict:
  """Returns {diagnostic: (badness per chunk [C], alarm per chunk [C])} of one run (module docstring)."""
  c, t, n_layers = norm_CxTxL.shape
  floor_C = np.min(norm_CxTxL.mean(1) / np.maximum(norm_CxTxL[0, 0], 1e-30), axis=1)
  cos_flat = cos_CxTxL.reshape(c * t, n_layers).copy()
  cos_flat[0] = np.nan  # step 0 has no previous gradient
  with warnings.catch_warnings():  # a one-step first chunk (smoke path) has no cosine: NaN, never an alarm
    warnings.simplefilter("ignore", RuntimeWarning)
    direction_C = np.min(np.nanmean(cos_flat.reshape(c, t, n_layers), axis=1), axis=1)
  ratio_C, res_alarm = residual_alarms(growth_CxL, names)
  with np.errstate(divide="ignore"):
    return {"residual": (ratio_C, res_alarm),
            "floor": (-np.log10(np.maximum(floor_C, 1e-30)), floor_C < GRAD_FLOOR),
            "direction": (-direction_C, direction_C < DIRECTION_FLOOR)}


def first(alarm_SxC) -> np.ndarray:
  """Returns the first alarming chunk (1-based) per seed, C + 1 where none."""
  chunks = alarm_SxC.shape[1]
  return np.where(alarm_SxC.any(1), alarm_SxC.argmax(1) + 1, chunks + 1).astype(np.float64)


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  chunks = min(CHUNKS, steps)
  chunk_steps = steps // chunks
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  names = [diag_lib.layer_name(i, config.num_layers) for i in range(config.num_layers)]
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  keys_S = harness.seed_keys(key, seeds)
  random_S = jax.vmap(lambda k: init_params(config, jax.random.fold_in(k, 1)))(keys_S)
  pool = W.collate(W.examples("behaviour", 1024, np.random.default_rng(7), world, preference=True))
  general, skills = held_out(world, smoke)
  lrs = {t: W.lr_for("qwen3", t, base_S, pc=pc, quick=quick, steps=steps) for t in sorted({t for _, t, _ in ARMS.values()})}
  starts = {"base": base_S, "random": random_S}
  t0 = time.perf_counter()
  runs = [train_arm(config, starts[start], keys_S, pool, lrs[t]["lr"], general, skills, chunks, chunk_steps)
          for start, t, _ in ARMS.values()]
  (loss, norm, cos), (growth, cap) = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *runs)
  t1 = time.perf_counter()
  out, trajectories = {}, {}
  for p, (arm, (_, _, kind)) in enumerate(ARMS.items()):
    figs = [diagnostics(norm[p, s], cos[p, s], growth[p, s], names) for s in range(seeds)]
    alarm = {d: np.stack([f[d][1] for f in figs]) for d in DIAGNOSTICS}  # [S, C]
    any_SxC = np.any(np.stack(list(alarm.values())), axis=0)
    o = timing_metrics(cap[p, :, 0], cap[p, :, 1:], any_SxC)
    for d in DIAGNOSTICS:
      o[f"fired_{d}"] = alarm[d].any(1).astype(np.float64)
      o[f"fire_chunk_{d}"] = first(alarm[d])
      o[f"worst_{d}"] = np.asarray([np.max(f[d][0]) for f in figs])
    out[arm] = o
    trajectories[arm] = {"kind": kind, "capability_mean": cap[p].mean(0),
                         **{f"{d}_mean": np.mean([f[d][0] for f in figs], axis=0) for d in DIAGNOSTICS},
                         "alarms_per_chunk": any_SxC.sum(0), "final_loss_mean": float(loss[p, :, -1, -1].mean())}
  healthy = [a for a, (_, _, k) in ARMS.items() if k == "healthy"]
  degenerate = [a for a, (_, _, k) in ARMS.items() if k == "degenerate"]
  gap = lambda d: (np.min([out[a][f"worst_{d}"] for a in degenerate], axis=0)
                   - np.max([out[a][f"worst_{d}"] for a in healthy], axis=0))
  out["separation"] = {f"gap_{d}": gap(d) for d in DIAGNOSTICS}
  cfg = {"steps": steps, "chunks": chunks, "chunk_steps": chunk_steps, "batch_size": W.BATCH, "objective": "orpo",
         "gradient_mode": "full", "optimizer": "dreamjax.optim.apollo(rank=8)",
         "limits": {"residual_growth_vs_base": guard_lib.GuardConfig().max_residual_growth_vs_base,
                    "grad_floor": GRAD_FLOOR, "direction_floor": DIRECTION_FLOOR},
         "held_out": {"general": EVAL_GENERAL, "per_skill": EVAL_SKILL}, "lr_calibration": lrs, "base": base_info,
         "model": str(config), "seeds_vmapped": True, "trajectories": trajectories,
         "timing": {"train_s": t1 - t0, "host_s": time.perf_counter() - t1}}
  return harness.Outcome(data=out, config=cfg, notes=run_notes(out, lrs, healthy, degenerate, seeds, chunks))


def run_notes(out, lrs, healthy, degenerate, seeds, chunks) -> list[str]:
  """Returns computed notes: lr mapping, alarms per arm and diagnostic, the pooled separation gaps."""
  notes = [f"lr mapping: ||Δθ||/||θ|| per step {t:g} → lr {v['lr']:.3g} (≈ lr {v['real_lr_equivalent']:.1g} "
           "on a 7B model)" for t, v in lrs.items()]
  iqm = harness.stats.iqm
  limit = {"residual": guard_lib.GuardConfig().max_residual_growth_vs_base, "floor": -math.log10(GRAD_FLOOR),
           "direction": -DIRECTION_FLOOR}
  for arm in ARMS:
    o = out[arm]
    per = ", ".join(f"{d} {int(o[f'fired_{d}'].sum())}/{seeds} (worst IQM {iqm(o[f'worst_{d}']):.3g}, limit "
                    f"{limit[d]:.3g})" for d in DIAGNOSTICS)
    notes.append(f"{arm}: alarms {per}; capability loss IQM {iqm(o['cap_loss']):.1f} pp; median first alarm chunk "
                 f"{np.median(o['fire_chunk']):g}, median 50%-loss chunk {np.median(o['half_chunk']):g} (of {chunks}; "
                 f"{chunks + 1} = never)")
  for d in DIAGNOSTICS:
    h = max(float(np.max(out[a][f"worst_{d}"])) for a in healthy)
    r = float(np.max(out["random_init"][f"worst_{d}"])) if "random_init" in out else math.nan
    g = min(float(np.min(out[a][f"worst_{d}"])) for a in degenerate)
    notes.append(f"{d}: pooled over seeds, degenerate min {g:.3g} − healthy max {h:.3g} = gap {g - h:+.3g} "
                 f"(random-init max {r:.3g}; worst-score units, higher = worse)")
  return notes


SIMULATION = harness.Simulation(
    name="x10_health_diagnostics",
    question="Do per-layer training-health figures (residual growth, a gradient-norm floor, the direction "
             "stability of consecutive gradients) separate a degenerate fine-tuning run from healthy ones, "
             "alarm on the degenerate run, and stay silent on healthy runs and on a random-init model?",
    prediction="per-layer training-health diagnostics catch a degenerate run early and do not flag healthy or "
               "untrained ones",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed; ORPO (full "
          f"backprop) + APOLLO on diverse behaviour preference pairs, {W.FINETUNE_STEPS} steps (quick "
          f"{W.QUICK_FINETUNE_STEPS}) of batch 32 in 10 "
          "chunks; per-step ||Δθ||/||θ|| 5e-4 and 2e-3 (healthy), 5e-2 (destructive); a random init trained at "
          "2e-3. Per-step per-layer gradient norms and consecutive-gradient cosines, per-chunk residual growth on "
          "64 held-out general examples; limits fixed before the run: residual growth vs start > 2 (the project's "
          "GuardConfig default), a layer's gradient norm < 1% of its first step, a layer's mean consecutive-gradient "
          "cosine < 0.",
    arms={"healthy_5e-4": "update size 5e-4/step (≈ lr 1e-5 on a 7B model)",
          "healthy_2e-3": "update size 2e-3/step (≈ lr 4e-5)",
          "destructive_5e-2": "update size 5e-2/step (≈ lr 1e-3): a degenerate run",
          "random_init": "a random init (not pretrained) at 2e-3/step: the untrained control",
          "separation": "per seed, min over degenerate runs − max over healthy runs of each diagnostic's worst value"},
    criteria=[
        *[harness.Criterion(arm=arm, metric="fired", statistic="mean", threshold=0.0, direction="less",
                            description=f"{arm}: no diagnostic alarms on any seed (mean's CI upper end = 0)")
          for arm in ("healthy_5e-4", "healthy_2e-3", "random_init")],
        harness.Criterion(arm="destructive_5e-2", metric="fired", statistic="mean", threshold=1.0, direction="greater",
                          description="the degenerate run is caught: some diagnostic alarms on every seed"),
    ],
    controls=[
        harness.Control(kind="positive", arm="destructive_5e-2", metric="cap_loss", statistic="iqm", threshold=20.0,
                        direction="greater", description="the destructive run loses more than 20 pp of general-skill "
                                                         "accuracy (it is degenerate)"),
        *[harness.Control(kind="negative", arm=arm, metric="cap_loss", statistic="iqm", threshold=5.0, direction="less",
                          description=f"{arm} loses at most 5 pp (healthy, so an alarm would be false)")
          for arm in ("healthy_5e-4", "healthy_2e-3")],
    ],
    effects=[
        *[harness.Effect(arm="separation", metric=f"gap_{d}", statistic="iqm") for d in DIAGNOSTICS],
        harness.Effect(arm="destructive_5e-2", metric="fire_chunk", statistic="iqm"),
        harness.Effect(arm="destructive_5e-2", metric="half_chunk", statistic="iqm"),
        harness.Effect(arm="destructive_5e-2", metric="early", statistic="mean"),
        *[harness.Effect(arm="destructive_5e-2", metric=f"fire_chunk_{d}", statistic="iqm") for d in DIAGNOSTICS],
        *[harness.Effect(arm=arm, metric=f"fired_{d}", statistic="mean") for arm in ("healthy_2e-3", "random_init")
          for d in DIAGNOSTICS],
    ],
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=95,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
