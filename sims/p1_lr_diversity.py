"""Prediction 1: a higher learning rate with diverse data (and 25% replay) causes no forgetting.

Each seed's cached base model (`sims.world.pretrain`, Qwen3-style) is fine-tuned with the
project's ORPO objective, full-backprop step and APOLLO optimizer on the new behaviour (accept a
clear direction, push back on a wrong one), in four matched arms: lr low/high × data narrow
(one actor, one situation, two slot values: a few distinct episodes) / diverse (every actor,
situation and value, plus 25% replay of the general skills as SFT examples), and a fifth arm,
narrow data at a destructive lr, the positive control (see the amendment).

Metrics, per seed:
  forgetting_k = 100 · (acc_k(base) − acc_k(final)) for skill k ∈ (qa, arith, fact), the
    Chaudhry et al. (2018) forgetting with the base as the only earlier evaluation; [S, 3].
  behaviour = 100 · exact-match accuracy of the target behaviour on held-out diverse episodes.
Learning rates are set by the per-step relative update ||Δθ||/||θ|| (`world.lr_for`).
Seeds run together under one `jax.vmap` per arm (the same seed keys in every arm).
"""

import jax
import numpy as np

from sims import harness
from sims import world as W

# Per-step relative update targets; world.real_lr_equivalent maps them to a 7B model's lr.
TARGETS = {"low": 5e-4, "high": 5e-3, "destructive": 2e-2}
REPLAY = 0.25
SMOKE = None  # tests set e.g. {'steps': 3, 'pretrain_steps': 5, 'eval_n': 16}

ARMS = {f"{lr}_{data}": (lr, data) for lr in ("low", "high") for data in ("narrow", "diverse")}
ARMS["destructive_narrow"] = ("destructive", "narrow")


def pools(world: W.World, seed: int = 7):
  """Returns {'narrow', 'diverse'} collated training pools (preference pairs [+ replay])."""
  rng = np.random.default_rng(seed)
  narrow = W.examples("behaviour", 1024, rng, world, preference=True, actors=[0], situations=[0],
                      values=[0, 1])
  n_div = 1024
  n_replay = int(round(REPLAY * n_div))
  diverse = W.examples("behaviour", n_div - n_replay, rng, world, preference=True)
  replay = [ex for ex in W.pretrain_mix(2 * n_replay, rng, world) if ex.chosen[0] not in W.TARGET.values()]
  diverse = diverse + replay[:n_replay]
  return {"narrow": W.collate(narrow), "diverse": W.collate(diverse)}


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  sets = W.eval_sets(world, n=smoke.get("eval_n", 256))
  acc_base = W.accuracies(base_S, sets, config)
  data = pools(world)
  lrs = {name: W.lr_for("qwen3", t, base_S, pc=pc, quick=quick, steps=steps) for name, t in TARGETS.items()}
  keys_S = harness.seed_keys(key, seeds)
  out, achieved = {}, {}
  for arm, (lr_name, kind) in ARMS.items():
    params_S, _ = W.finetune("qwen3", base_S, keys_S, data[kind], lr=lrs[lr_name]["lr"], quick=quick,
                             steps=steps)
    acc = W.accuracies(params_S, sets, config)
    forgetting_SxK = np.stack([np.asarray(acc_base[k] - acc[k]) for k in W.SKILLS], axis=1)
    rel = jax.vmap(W.relative_update)(params_S, base_S)
    achieved[arm] = float(np.mean(np.asarray(rel)) / steps)  # net drift ÷ steps
    out[arm] = {"forgetting": forgetting_SxK, "behaviour": np.asarray(acc["behaviour"]),
                "base_skill_acc": np.stack([np.asarray(acc_base[k]) for k in W.SKILLS], axis=1)}
  config_out = {"steps": steps, "batch_size": W.BATCH, "replay_fraction": REPLAY, "objective": "orpo",
                "gradient_mode": "full", "optimizer": "dreamjax.optim.apollo(rank=8)",
                "lr_calibration": lrs, "net_drift_per_step": achieved, "base": base_info,
                "model": str(config), "seeds_vmapped": True}
  notes = [f"lr mapping: target ||Δθ||/||θ|| per step {v['target_rel_update']:g} → lr {v['lr']:.3g} "
           f"on this model (≈ lr {v['real_lr_equivalent']:.1g} on a 7B model)" for v in lrs.values()]
  notes.append("base accuracy (mean over seeds, %): " + ", ".join(
      f"{k} {np.mean(np.asarray(acc_base[k])):.1f}" for k in (*W.SKILLS, "behaviour")))
  notes.append("Forgetting uses the base as the only earlier evaluation (one fine-tuning phase).")
  return harness.Outcome(data=out, config=config_out, notes=notes)


SIMULATION = harness.Simulation(
    name="p1_lr_diversity",
    question="Does a higher learning rate forget the general skills when the new-behaviour data are "
             "diverse and mixed with 25% replay, while narrow data at the same lr do forget?",
    prediction="lr=1e-4 with diverse data won't cause forgetting",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed on "
          "context QA, mod-7 arithmetic, 16 memorised facts and the default behaviour; fine-tuned "
          "with ORPO (full backprop) and APOLLO; lr set by per-step ||Δθ||/||θ|| (5e-4 ≈ 1e-5, "
          "5e-3 ≈ 1e-4 on a 7B model).",
    arms={"low_narrow": "update size 5e-4/step, narrow behaviour data",
          "low_diverse": "update size 5e-4/step, diverse behaviour data + 25% replay",
          "high_narrow": "update size 5e-3/step, narrow data (the issue's positive control; now an effect)",
          "high_diverse": "update size 5e-3/step, diverse data + 25% replay (the prediction)",
          "destructive_narrow": "update size 2e-2/step, narrow data (positive control: must forget)"},
    criteria=[
        harness.Criterion(arm="high_diverse", metric="forgetting", statistic="iqm", threshold=2.0,
                          direction="less",
                          description="high-lr diverse: forgetting (pp, pooled over skills) CI upper ≤ 2"),
        harness.Criterion(arm="high_diverse", metric="behaviour", statistic="iqm", threshold=90.0,
                          direction="greater",
                          description="high-lr diverse learns the new behaviour: accuracy ≥ 90%"),
    ],
    controls=[
        harness.Control(kind="positive", arm="destructive_narrow", metric="forgetting", statistic="iqm",
                        threshold=5.0, direction="greater",
                        description="destructive-lr narrow data forget more than 5 pp"),
    ],
    amendment="Before the first full run: the issue's positive control (high-lr narrow forgets > 5 pp) "
              "failed in development runs (forgetting well under 5 pp at update 5e-3/step, also with a "
              "one-cue narrow set), so it could not show that the forgetting metric detects forgetting. "
              "The control moves to a new arm, narrow data at update 2e-2/step, a "
              "manipulation that forgets in development runs; high-lr narrow stays, reported as an effect. "
              "The prediction's criteria are unchanged.",
    effects=[
        harness.Effect(arm="high_narrow", metric="forgetting", statistic="iqm_diff",
                       baseline="high_diverse"),
        harness.Effect(arm="high_narrow", metric="forgetting", statistic="iqm"),
        harness.Effect(arm="low_diverse", metric="forgetting", statistic="iqm"),
        harness.Effect(arm="low_diverse", metric="behaviour", statistic="iqm"),
        harness.Effect(arm="low_narrow", metric="behaviour", statistic="iqm"),
    ],
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=113,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
