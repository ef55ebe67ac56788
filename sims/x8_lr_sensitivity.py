"""x8: preference losses need a far smaller learning rate than SFT (≈ 40x for DPO).

Each seed's cached Qwen3-style base (`sims.world.pretrain`) is fine-tuned on the same 1024 diverse
behaviour preference pairs (`world.behaviour_example`, chosen = the target, rejected =
`world.REJECTED`) with three of the project's objectives through its train step (`world.finetune_seeds`,
full backprop, APOLLO): SFT (on the chosen answers), DPO (reference = the base) and ORPO, at L
log-spaced learning rates, seeds vmapped; lr and objective are traced arguments of the suite's shared
fine-tuning program (`sims.engine`), so the sweep adds no compile. The grid is shared by the three
objectives, anchored on the suite's ORPO calibration (lr ≈ per-step ||Δθ||/||θ|| × lr_unit):

  lr_l = lr_unit · 10^(e_l),  e_l = −4, −3.5, …, −0.5   (8 update-size targets, half a decade apart)

Metrics, per seed:
  capability(θ)  = mean of the held-out exact-match accuracies (%) of the general skills the base
                   has (context QA and memorised facts; arithmetic is near chance in the base)
  drop_l         = capability(base) − capability(θ_l)   (pp)
  log10_break    = log10 of the smallest swept lr with drop_l > 5 pp; a seed whose drop never
                   exceeds 5 pp is censored at one grid step above the top lr (counted in the notes)
  drop_top, drop_bottom = drop at the largest and smallest swept lr (the sweep's bracketing)
The criterion reads IQM(sft.log10_break) − IQM(dpo.log10_break) = log10 of the SFT ÷ DPO ratio of
breaking lrs: DPO's breaking lr ≤ SFT's / 10 ⇔ the difference ≥ 1.
"""

import jax
import numpy as np

from sims import engine
from sims import harness
from sims import world as W

OBJECTIVES = ("sft", "dpo", "orpo")
EXPONENTS = tuple(np.arange(-4.0, -0.49, 0.5))  # update-size targets 1e-4 … 10^-0.5 per step
STEPS, QUICK_STEPS = 30, 20
BATCH = 16
POOL = 1024
DROP = 5.0  # pp of held-out capability that counts as broken
CAPABILITY = ("qa", "fact")
SMOKE = None  # tests set {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


def sweep(config, objective: str, base_S, keys_S, pool, lrs_L, steps: int):
  """Returns (params [L, S, ...], rel update [L, S, steps]): fine-tuning at each lr (`world.finetune_seeds`)."""
  runs = [W.finetune_seeds(config, base_S, keys_S, pool, lr=float(lr), steps=steps, batch_size=BATCH,
                           objective=objective, with_rel_update=True) for lr in np.asarray(lrs_L, np.float32)]
  return engine.stack([p for p, _, _ in runs]), np.stack([rel for _, _, rel in runs])


def capability(params, sets, config):
  """Returns the mean accuracy (%) over CAPABILITY skills; params carry any leading axes."""
  lead = params["embed"].shape[:-2]
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[len(lead):]), params)
  acc = W.accuracies(flat, {k: sets[k] for k in CAPABILITY}, config)
  return np.mean([np.asarray(acc[k]) for k in CAPABILITY], axis=0).reshape(lead)


def breaking(drop_SxL, exponents_L):
  """Returns (log10 breaking lr [S], found [S]): the first lr with drop > DROP, censored above the top."""
  broken = drop_SxL > DROP
  found = broken.any(axis=1)
  step = exponents_L[1] - exponents_L[0] if len(exponents_L) > 1 else 1.0
  first = np.where(found, np.argmax(broken, axis=1), len(exponents_L))
  return np.append(exponents_L, exponents_L[-1] + step)[first], found.astype(np.float64)


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", QUICK_STEPS if quick else STEPS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  sets = W.eval_sets(world, n=smoke.get("eval_n", 256))
  cap_base_S = capability(base_S, sets, config)
  calib = W.lr_for("qwen3", 1.0, base_S, pc=pc, quick=quick, steps=smoke.get("steps"))
  exps = np.asarray(EXPONENTS[::3] if smoke else EXPONENTS)
  lrs_L = calib["lr"] * 10.0 ** exps
  log_lrs_L = np.log10(lrs_L)
  pool = W.collate(W.examples("behaviour", POOL, np.random.default_rng(81), world, preference=True))
  keys_S = harness.seed_keys(key, seeds)
  out, rel = {}, {}
  for objective in OBJECTIVES:
    params_LS, rel_LSxT = sweep(config, objective, base_S, keys_S, pool, lrs_L, steps)
    drop_SxL = (cap_base_S[None, :] - capability(params_LS, sets, config)).T
    log10_break, found = breaking(drop_SxL, log_lrs_L)
    out[objective] = {"log10_break": log10_break, "found": found, "drop_top": drop_SxL[:, -1],
                      "drop_bottom": drop_SxL[:, 0], "drop_by_lr": drop_SxL}
    rel[objective] = np.asarray(rel_LSxT).mean(axis=(1, 2))
  cfg = {"steps": steps, "batch_size": BATCH, "pool": POOL, "drop_threshold_pp": DROP, "capability": CAPABILITY,
         "lrs": lrs_L, "update_targets": 10.0 ** exps, "lr_unit_calibration": calib,
         "mean_rel_update_per_step": {o: v for o, v in rel.items()}, "base": base_info, "seeds_vmapped": True}
  fmt = lambda v: ", ".join(f"{x:.2g}" for x in v)
  notes = [f"lr grid: {fmt(lrs_L)}",
           "base capability (mean of qa, fact; %): " + fmt(cap_base_S),
           *[f"{o}: mean drop (pp) per lr: {fmt(out[o]['drop_by_lr'].mean(0))}; measured per-step update per lr: "
             f"{fmt(rel[o])}; seeds broken within the sweep: {int(out[o]['found'].sum())}/{seeds}"
             for o in OBJECTIVES],
           *[f"breaking lr ratio {a} ÷ {b} (10^(IQM difference of log10)): "
             f"{10 ** (harness.stats.iqm(out[a]['log10_break']) - harness.stats.iqm(out[b]['log10_break'])):.3g}"
             for a, b in (("sft", "dpo"), ("sft", "orpo"), ("orpo", "dpo"))]]
  return harness.Outcome(data=out, config=cfg, notes=notes)


SIMULATION = harness.Simulation(
    name="x8_lr_sensitivity",
    question="At what learning rate does fine-tuning start to break held-out general capability, for SFT, DPO "
             "and ORPO on the same data, and is DPO's breaking lr at least 10x smaller than SFT's?",
    prediction="preference losses need a far smaller lr than SFT (≈40x for DPO)",
    setup="sims.world, Qwen3-style tiny decoder pretrained per seed; 1024 diverse behaviour preference pairs; "
          "the project's SFT (chosen answers), DPO (β = 0.1, reference = base) and ORPO (β = 0.1), APOLLO, full "
          "backprop, 30 steps × batch 16 (quick: 20) at each of 8 lrs half a decade apart (update 1e-4 … 0.3 per "
          "step by the ORPO calibration); capability = mean held-out accuracy on context QA and facts.",
    arms={"sft": "SFT on the chosen answers, lr sweep",
          "dpo": "DPO (reference = base), lr sweep",
          "orpo": "ORPO, lr sweep"},
    criteria=[
        harness.Criterion(arm="sft", baseline="dpo", metric="log10_break", statistic="iqm_diff", threshold=1.0,
                          direction="greater",
                          description="log10(SFT's breaking lr ÷ DPO's) ≥ 1: DPO's breaking lr ≤ SFT's / 10"),
    ],
    controls=[
        *[harness.Control(kind="positive", arm=o, metric="drop_top", statistic="iqm", threshold=DROP,
                          direction="greater",
                          description=f"the sweep reaches breaking: {o.upper()} at the top lr drops capability > 5 pp")
          for o in ("sft", "dpo")],
        *[harness.Control(kind="negative", arm=o, metric="drop_bottom", statistic="iqm", threshold=DROP,
                          direction="less",
                          description=f"the sweep starts below breaking: {o.upper()} at the bottom lr drops ≤ 5 pp")
          for o in ("sft", "dpo")],
    ],
    effects=[
        harness.Effect(arm="sft", baseline="orpo", metric="log10_break", statistic="iqm_diff"),
        harness.Effect(arm="orpo", baseline="dpo", metric="log10_break", statistic="iqm_diff"),
        *[harness.Effect(arm=o, metric="log10_break", statistic="iqm") for o in OBJECTIVES],
        harness.Effect(arm="orpo", metric="drop_top", statistic="iqm"),
    ],
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=115,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
