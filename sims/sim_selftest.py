"""Harness self-check (not a prediction): a synthetic effect of known size and sign.

Scores for seed s, task k and arm a are

    score_{s,k,a} = offset_k + effect_a + u_s + ε_{s,k,a},   u_s ~ N(0, 0.5²),  ε ~ N(0, 0.3²)

with task offsets (0, 2, 5) as strata, a per-seed shift u_s shared by every arm (what matched
arms share: the same init and data order) and effect_a = 0 (control, placebo), 1 (treated),
3 (positive control). The IQM difference treated − control is 1 by construction, so the run must
say SUPPORTED, the positive control must pass and the placebo must sit inside ±0.5; anything
else is a harness bug. Generated per seed in JAX and run through `harness.vmap_seeds`.
"""

import functools

import jax
import jax.numpy as jnp

from sims import harness

TASK_OFFSETS = (0.0, 2.0, 5.0)
EFFECTS = {"control": 0.0, "treated": 1.0, "positive_control": 3.0, "placebo": 0.0}
SEED_SD, NOISE_SD = 0.5, 0.3


def one_seed(key, arm_index: int, effect: float):
  """Returns {'score': [K]} for one seed and one arm."""
  seed_shift = SEED_SD * jax.random.normal(key)  # shared by all arms of this seed
  noise_K = NOISE_SD * jax.random.normal(jax.random.fold_in(key, arm_index + 1), (len(TASK_OFFSETS),))
  return {"score": jnp.asarray(TASK_OFFSETS) + effect + seed_shift + noise_K}


def run(seeds: int, quick: bool, key):
  del quick  # already seconds; the quick path only has fewer seeds
  # jit=False: these few ops run faster eagerly than compiled; real simulations keep the default.
  data = {arm: harness.vmap_seeds(functools.partial(one_seed, arm_index=i, effect=effect), key,
                                  seeds, jit=False)
          for i, (arm, effect) in enumerate(EFFECTS.items())}
  config = {"task_offsets": TASK_OFFSETS, "effects": EFFECTS, "seed_sd": SEED_SD, "noise_sd": NOISE_SD}
  return harness.Outcome(data=data, config=config)


def interpret(analysis, data):
  del data
  c = analysis["criteria"][0]
  inside = c["lo"] <= EFFECTS["treated"] <= c["hi"]
  return [f"The true difference {EFFECTS['treated']:g} lies {'inside' if inside else 'OUTSIDE'} "
          f"the 95% CI [{c['lo']:.4g}, {c['hi']:.4g}] of {c['label']}."]


SIMULATION = harness.Simulation(
    name="sim_selftest",
    selfcheck=True,
    question="Do the statistics, verdict rules, figures and report work end to end?",
    prediction="(Harness self-check) A synthetic treatment with a known effect of +1 raises the "
               "IQM score by at least 0.3 and beats control with probability ≥ 0.6.",
    setup="Numbers drawn in JAX, no model: score = task offset (0, 2, 5; the strata) + arm effect "
          "+ a per-seed shift shared by all arms (sd 0.5) + noise (sd 0.3), three tasks per seed.",
    arms={"control": "effect 0",
          "treated": "effect +1 (the 'treatment')",
          "positive_control": "effect +3: known to show the effect",
          "placebo": "effect 0 with fresh noise: must show no effect"},
    criteria=[
        harness.Criterion(arm="treated", metric="score", statistic="iqm_diff", baseline="control",
                          threshold=0.3, direction="greater",
                          description="treated beats control by at least 0.3 (truth: 1)"),
        harness.Criterion(arm="treated", metric="score", statistic="prob_improvement",
                          baseline="control", threshold=0.6, direction="greater",
                          description="a treated run beats a control run on the same task with "
                                      "probability at least 0.6"),
    ],
    controls=[
        harness.Control(kind="positive", arm="positive_control", metric="score",
                        statistic="iqm_diff", baseline="control", threshold=1.0,
                        direction="greater", description="the +3 manipulation shows ≥ 1"),
        harness.Control(kind="negative", arm="placebo", metric="score", statistic="iqm_diff",
                        baseline="control", threshold=(-0.5, 0.5), direction="within",
                        description="the placebo moves the IQM by less than 0.5 either way"),
    ],
    effects=[
        harness.Effect(arm="positive_control", metric="score", statistic="prob_improvement",
                       baseline="control"),
        harness.Effect(arm="treated", metric="score", statistic="iqm_diff", baseline="control",
                       paired=False, label="IQM(treated) − IQM(control), unpaired bootstrap"),
    ],
    run=run,
    interpret=interpret,
    seeds=16,
    quick_seeds=6,
)
