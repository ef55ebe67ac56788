"""x4: DPO can lower the preferred answer's likelihood; ORPO and DPOP do not.

Each seed's cached Qwen3-style base (`sims.world.pretrain`) was SFT-trained to give the default
answer y_w = [SUGGEST, actor, EOS] to every cue, so it starts where DPO usually starts: a model
after SFT on the chosen answers, with log π(y_w) near 0. It is then tuned on preference pairs whose
chosen answer is that default, with the project's objectives (`dreamjax.objectives` through
`dreamjax.train.step`, via `world.finetune_seeds`), APOLLO, full backprop, the starting
params as the frozen reference of DPO/DPOP, at two edit distances built from world tokens:

  small: y_l = [b', actor, EOS]        shares all but the behaviour token with y_w
  large: y_l = [b', actor', value]     differs from y_w at every position
         (b' ∈ {ACCEPT, PUSHBACK}, actor' ≠ actor, value a value token: no EOS)

Arms: objective ∈ {dpo, dpop, orpo} × distance ∈ {small, large}, seeds vmapped; every arm runs the
suite's shared fine-tuning program (`sims.engine`: the objective is a traced switch). Every arm uses the same lr (the
suite's ORPO calibration, per-step ||Δθ||/||θ|| = 5e-3): the objectives differ, the step size does not.

Metrics, per seed, on 256 held-out pairs of the arm's kind (fresh episodes), with summed response
log-probs log π(y) from `dreamjax.train.step.response_logprobs_full`:
  d_chosen   = mean_i [log π_θ(y_w,i) − log π_0(y_w,i)]     (nats; π_0 = the starting model)
  d_rejected = mean_i [log π_θ(y_l,i) − log π_0(y_l,i)]
  d_other    = 100 · mean_i [o_θ,i − o_0,i],  o = 1 − π(y_w) − π(y_l): probability mass moved to
               responses that are neither chosen nor rejected (pp)
  lowered    = 1[d_chosen < 0],  kept = 1[d_chosen ≥ 0],  rejected_lowered = 1[d_rejected < 0]
A criterion's `mean` of an indicator is the fraction of seeds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.train import step as step_lib
from dreamjax.train.batch import TokenizedExample
from sims import engine
from sims import harness
from sims import world as W

TARGET = 5e-3  # per-step ||Δθ||/||θ|| of the shared ORPO calibration (p1's high arm, ≈ lr 1e-4 on 7B)
OBJECTIVES = ("dpo", "dpop", "orpo")
DISTANCES = ("small", "large")
STEPS, QUICK_STEPS = 60, 30
BATCH = 16  # half the suite's batch: three objective compiles already take most of the CPU budget
POOL = 1024
SMOKE = None  # tests set {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


def pairs(n: int, rng, world: W.World, distance: str) -> list[TokenizedExample]:
  """Returns n pairs: chosen = the base's default answer, rejected at the given edit distance."""
  out = []
  for ex in W.examples("behaviour", n, rng, world, default=True):
    other = (W.ACCEPT, W.PUSHBACK)[int(rng.integers(2))]
    actor = ex.chosen[1]
    rejected = [other, actor, W.EOS]
    if distance == "large":
      actor2 = W.ACTOR0 + (actor - W.ACTOR0 + 1 + int(rng.integers(W.N_ACTORS - 1))) % W.N_ACTORS
      rejected = [other, actor2, W.VALUE0 + int(rng.integers(W.N_VALUES))]
    out.append(TokenizedExample(context=ex.context, chosen=list(ex.chosen), rejected=rejected))
  return out


def stacked_pools(world: W.World, n: int, seed: int):
  """Returns one PreferenceBatch per distance stacked on a leading [2] axis (small, large)."""
  rng = np.random.default_rng(seed)
  pools = [W.collate(pairs(n, rng, world, d)) for d in DISTANCES]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *pools)


def train(config, objective: str, base_S, keys_S, pools_2, lr: float, steps: int):
  """Returns (params [2, S, ...], rel update [2, S, steps]): each pool's fine-tuning (`world.finetune_seeds`)."""
  runs = [W.finetune_seeds(config, base_S, keys_S, engine.take(pools_2, i), lr=lr, steps=steps,
                           batch_size=BATCH, objective=objective, with_rel_update=True) for i in range(len(DISTANCES))]
  return engine.stack([p for p, _, _ in runs]), np.stack([rel for _, _, rel in runs])


@functools.partial(jax.jit, static_argnames=("config",))
def logprobs(params, batch, *, config):
  """Returns (log π(y_w) [B], log π(y_l) [B]): summed response log-probs (the train step's own)."""
  chosen, rejected = step_lib.response_logprobs_full(params, batch, config)
  return chosen.sum_B, rejected.sum_B


def pair_metrics(params_S, base_S, batch, config) -> dict:
  """Returns {metric: [S]} comparing tuned and starting models on held-out pairs."""
  lp = jax.vmap(lambda p: logprobs(p, batch, config=config))
  c, r = (np.asarray(x, np.float64) for x in lp(params_S))
  c0, r0 = (np.asarray(x, np.float64) for x in lp(base_S))
  other = lambda a, b: 1.0 - np.exp(a) - np.exp(b)
  d_chosen, d_rejected = (c - c0).mean(1), (r - r0).mean(1)
  return {"d_chosen": d_chosen, "d_rejected": d_rejected,
          "d_other": 100.0 * (other(c, r) - other(c0, r0)).mean(1),
          "lowered": (d_chosen < 0).astype(np.float64), "kept": (d_chosen >= 0).astype(np.float64),
          "rejected_lowered": (d_rejected < 0).astype(np.float64),
          "base_chosen": c0.mean(1), "base_rejected": r0.mean(1)}


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", QUICK_STEPS if quick else STEPS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  n_eval = smoke.get("eval_n", 256)
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  lr = W.lr_for("qwen3", TARGET, base_S, pc=pc, quick=quick, steps=smoke.get("steps"))
  pools = stacked_pools(world, POOL, seed=41)
  evals = {d: W.collate(pairs(n_eval, np.random.default_rng(4141 + i), world, d)) for i, d in enumerate(DISTANCES)}
  keys_S = harness.seed_keys(key, seeds)
  out, achieved = {}, {}
  for objective in OBJECTIVES:
    params_2S, rel_2SxT = train(config, objective, base_S, keys_S, pools, lr["lr"], steps)
    for i, d in enumerate(DISTANCES):
      params_S = engine.take(params_2S, i)
      out[f"{objective}_{d}"] = pair_metrics(params_S, base_S, evals[d], config)
      achieved[f"{objective}_{d}"] = float(np.mean(np.asarray(rel_2SxT[i])))
  cfg = {"steps": steps, "batch_size": BATCH, "pool": POOL, "eval_pairs": n_eval, "optimizer": "apollo",
         "gradient_mode": "full", "lr_calibration": lr, "mean_rel_update_per_step": achieved,
         "reference": "the starting (base) params", "base": base_info, "seeds_vmapped": True}
  notes = [f"lr {lr['lr']:.3g} for every arm (ORPO calibration, ||Δθ||/||θ|| {TARGET:g}/step); measured mean "
           "per-step update: " + ", ".join(f"{a} {v:.2g}" for a, v in achieved.items()),
           "starting log π (nats, mean over seeds): " + ", ".join(
               f"{d}: chosen {np.mean(out[f'dpo_{d}']['base_chosen']):.3f}, rejected "
               f"{np.mean(out[f'dpo_{d}']['base_rejected']):.1f}" for d in DISTANCES),
           "seeds with lowered chosen log-prob: " + ", ".join(
               f"{a} {int(m['lowered'].sum())}/{seeds}" for a, m in out.items())]
  return harness.Outcome(data=out, config=cfg, notes=notes)


ARMS = {f"{o}_{d}": f"{o.upper()} on {d}-edit-distance pairs (chosen = the base's default answer)"
        for o in OBJECTIVES for d in DISTANCES}

SIMULATION = harness.Simulation(
    name="x4_preferred_likelihood",
    question="Starting from a model that already gives the chosen answer, does DPO lower the chosen answer's "
             "likelihood when chosen and rejected share all but one token, while ORPO and DPOP keep it?",
    prediction="DPO can lower the chosen answer's likelihood; ORPO and DPOP do not",
    setup="sims.world, Qwen3-style tiny decoder pretrained per seed (SFT on the general skills and the default "
          "answer); preference tuning with the project's DPO, DPOP (λ = 50) and ORPO (β = 0.1), APOLLO, full "
          "backprop, reference = the starting params, one lr for all (update 5e-3/step by the ORPO "
          "calibration); 1024 pairs with chosen = [SUGGEST, actor, EOS] and a rejected answer differing in one "
          "token (small) or in all three (large); 60 steps × batch 16 (quick: 30).",
    arms=ARMS,
    criteria=[
        harness.Criterion(arm="dpo_small", metric="lowered", statistic="mean", threshold=0.5, direction="greater",
                          description="DPO lowers the chosen log-prob in ≥ 50% of seeds at small edit distance"),
        *[harness.Criterion(arm=f"{o}_{d}", metric="kept", statistic="mean", threshold=0.9, direction="greater",
                            description=f"{o.upper()} keeps Δ log π(chosen) ≥ 0 in ≥ 90% of seeds ({d} distance)")
          for o in ("orpo", "dpop") for d in DISTANCES],
    ],
    controls=[
        harness.Control(kind="positive", arm="dpo_small", metric="rejected_lowered", statistic="mean",
                        threshold=0.9, direction="greater",
                        description="the measurement sees a lowered log-prob where the objective is built to "
                                    "lower one: DPO lowers the rejected log-prob in ≥ 90% of seeds"),
    ],
    effects=[
        *[harness.Effect(arm=a, metric="d_chosen", statistic="iqm") for a in ARMS],
        harness.Effect(arm="dpo_small", baseline="dpo_large", metric="d_chosen", statistic="iqm_diff"),
        harness.Effect(arm="dpo_large", metric="lowered", statistic="mean"),
        *[harness.Effect(arm=f"{o}_small", metric="d_other", statistic="iqm") for o in OBJECTIVES],
        *[harness.Effect(arm=f"{o}_small", metric="d_rejected", statistic="iqm") for o in OBJECTIVES],
    ],
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=84,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
