"""X1: how many targeted examples change a behaviour — 10–50 measurably, 100–200 robustly?

Each seed's cached Qwen3-style base (`sims.world.pretrain`) answers SUGGEST to every cue. The
targeted examples are behaviour preference pairs of the two cues whose target differs from that
default (clear direction → ACCEPT, wrong direction → PUSHBACK), alternating, each seed with its own
draw of 200 episodes. The arm n trains on the first n of them for exactly one pass: with batch
B = 5 (every n of the sweep is a whole number of batches) that is n / B steps of the project's
ORPO objective, full-backprop train step and APOLLO optimizer, in order, each example once.

Every arm runs the suite's shared fine-tuning program (`sims.engine`) on a per-arm index table
of STEPS_MAX = 200 / B = 40 rows, for its own n / B steps (the step count is traced: one compile
for all arms); seeds are vmapped. Learning rates are set by update size (`world.lr_for`).

Metrics, per seed (fresh held-out episodes of the two targeted cues, balanced):
  rate(n)   = 100 · mean_i [argmax p(r_0 | context_i) = TARGET[cue_i]]   (r_0: the behaviour token)
  change(n) = rate(n) − rate(base)   (pp; the base says SUGGEST, so rate(base) ≈ 0)
The criteria encode the claim on the IQM of change with its 95% stratified bootstrap interval:
change(50) ≥ 20 pp and change(200) ≥ 80 pp. The n at which each interval first clears +20 and
+80 pp is read off the per-n intervals (`interpret`).

Controls: `strong_200` (the same 200 examples at a 4x larger update size) must change the
behaviour by ≥ 80 pp (the setup and metric can show a robust change); `untargeted_200` (200
general-skill SFT examples, no behaviour data, same steps and lr) must change it by ≤ 5 pp.

`indexed_finetune` (index-table fine-tuning with a per-arm step count) is shared with
x2_epochs and x3_targeted_forgetting.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sims import engine
from sims import harness
from sims import world as W

NS = (5, 10, 20, 50, 100, 200)  # examples per arm, one pass
BATCH = 5  # every n in NS is a whole number of batches
TARGET = 5e-3  # per-step ||Δθ||/||θ|| (≈ lr 1e-4 on a 7B model; p1's high arm)
STRONG = 2e-2  # positive control's update size (p1's destructive arm)
TARGETED_CUES = (W.CUE_CLEAR, W.CUE_WRONG)  # the cues whose target differs from the default
POOL_SEED = 801
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}

ARMS = {f"n{n}": (n, "targeted", TARGET) for n in NS}
ARMS["strong_200"] = (max(NS), "targeted", STRONG)
ARMS["untargeted_200"] = (max(NS), "untargeted", TARGET)


# ---------------------------------------------------------------------------------------------
# Index-table fine-tuning (shared with x2 and x3).


def _per_arm(x_AxS, what: str) -> np.ndarray:
  """Returns x [A]: a setting given per (arm, seed) that must be the same for every seed of an arm."""
  x = np.asarray(x_AxS)
  if not np.all(x == x[:, :1]):
    raise ValueError(f"{what} must be the same for every seed of an arm")
  return x[:, 0]


def indexed_finetune(config, params_AxS, pool_AxS, idx_AxSxTxB, active_AxS, lr_AxS, restart_AxS=None, *,
                     optimizer: str = "apollo", objective: str = "orpo", dropout: float = 0.0, rng_AxS=None):
  """Returns (params [A, S, ...], snapshot [A, S, ...], rel_update [A, S, T]): A arms × S seeds.

  Model (a, s) starts from params_AxS[a, s] and takes min(active[a], T) project train steps
  (`sims.engine`, full backprop): step t trains on the batch pool[a, s][idx[a, s, t]]. After
  restart[a] steps (default: never) the params are saved as `snapshot` and a fresh optimizer state
  starts: a second fine-tuning job continues from them (e.g. a recovery phase on other index-table
  rows); without a restart (restart ≥ T) the snapshot is the starting params. rel_update is ||Δθ_t|| / ||θ_t||
  per step, NaN after the last. Arms run one after another with the seeds vmapped; index tables,
  pools, step counts and lrs are traced (one compile per batch size and dropout rate). active,
  lr and restart are per arm (the same for every seed). dropout: the train step's residual
  dropout rate; model (a, s) draws its masks from rng_AxS[a, s] (PRNG keys [A, S, 2]; default
  PRNGKey(0) for all).
  """
  a, s, steps, _ = np.shape(idx_AxSxTxB)
  active_A = np.minimum(_per_arm(active_AxS, "active"), steps)
  lr_A = _per_arm(lr_AxS, "lr")
  restart_A = np.full(a, steps) if restart_AxS is None else _per_arm(restart_AxS, "restart")
  idx = np.asarray(idx_AxSxTxB, np.int32)
  params, snaps, rels = [], [], []
  for i in range(a):
    rng_S = None if rng_AxS is None else rng_AxS[i]
    run = lambda state, t0, n: engine.run(config, state, engine.take(pool_AxS, i), idx[i, :, t0:],
                                          engine.arm(n, float(lr_A[i]), optimizer=optimizer, objective=objective),
                                          dropout=dropout)
    start = engine.take(params_AxS, i)
    first = int(min(restart_A[i], active_A[i]))
    res = run(engine.init(start, rng_S), 0, first)
    snap, rel = (res.params if restart_A[i] < steps else start), [res.rel_update(first)]
    if first < active_A[i]:  # the second job: a fresh optimizer state from the snapshot
      res = run(engine.init(res.params, rng_S), first, int(active_A[i]) - first)
      rel.append(res.rel_update(int(active_A[i]) - first))
    rel = np.concatenate(rel, axis=1)
    params.append(res.params)
    snaps.append(snap)
    rels.append(np.pad(rel, [(0, 0), (0, steps - rel.shape[1])], constant_values=np.nan))
  return engine.stack(params), engine.stack(snaps), np.stack(rels)


def tile_AxS(tree, a: int, s: int, seeds_first: bool = True):
  """Returns tree broadcast to leading axes [A, S]: from per-seed [S, ...] (seeds_first) or per-arm [A, ...]."""
  if seeds_first:
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (a, *x.shape)), tree)
  return jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], s, *x.shape[1:])), tree)


def flat(tree):
  """Returns a [A, S, ...] tree reshaped to [A·S, ...]."""
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def concat(*trees):
  """Returns trees with leading model axes concatenated (one evaluation shape: one compilation)."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def stack_sets(sets: dict):
  """Returns the eval batches (equal shapes) stacked on a leading set axis [K, B, ...]."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *sets.values())


@functools.partial(jax.jit, static_argnames=("config",))
def exact_match_MxK(params_M, sets_K, *, config):
  """Returns [M, K]: exact-match accuracy (%, `world.correct_B`) of every model on every stacked set."""
  acc = lambda p, b: W.correct_B(p, b, config=config).mean() * 100.0
  return jax.vmap(lambda p: jax.vmap(lambda b: acc(p, b))(sets_K))(params_M)


@functools.partial(jax.jit, static_argnames=("config",))
def exact_match_M(params_M, sets_M, *, config):
  """Returns [M]: exact-match accuracy (%) of model m on its own set m."""
  return jax.vmap(lambda p, b: W.correct_B(p, b, config=config).mean() * 100.0)(params_M, sets_M)


def stacked_accuracies(groups, sets: dict, config):
  """Returns [{set: accuracy % [M_g]} per group]: every group's models on every set in one call."""
  sizes = [int(jax.tree.leaves(g)[0].shape[0]) for g in groups]
  acc_MxK = np.asarray(exact_match_MxK(concat(*groups), stack_sets(sets), config=config))
  return [{k: part[:, j] for j, k in enumerate(sets)} for part in np.split(acc_MxK, np.cumsum(sizes)[:-1])]


# ---------------------------------------------------------------------------------------------
# This simulation.


def targeted_examples(rng, world: W.World, n: int, preference: bool = True):
  """Returns n behaviour examples of the targeted cues, alternating clear / wrong."""
  return [W.behaviour_example(rng, world, cue=TARGETED_CUES[i % 2], preference=preference) for i in range(n)]


def seed_pools(world: W.World, seeds: int, n: int):
  """Returns a collated pool [S, 2n, ...] per seed: n targeted pairs, then n untargeted skill examples."""
  pools = []
  for s in range(seeds):
    rng = np.random.default_rng([POOL_SEED, s])
    untargeted = [W.GENERATORS[W.SKILLS[i % 3]](rng, world) for i in range(n)]
    pools.append(W.collate(targeted_examples(rng, world, n) + untargeted))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *pools)


@functools.partial(jax.jit, static_argnames=("config",))
def rate_M(params_M, batch, *, config):
  """Returns [M]: % of examples whose argmax first response token is the target behaviour."""
  def one(params):
    pred_B = jnp.argmax(W.response_logits(params, batch, config)[:, 0], axis=-1)
    return jnp.mean(pred_B == batch.chosen_BxR[:, 0]) * 100.0
  return jax.vmap(one)(params_M)


def run(seeds: int, quick: bool, key):
  del key  # data order is the pool order; each seed's pool is its own draw (POOL_SEED, seed)
  smoke = SMOKE or {}
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  n_eval = smoke.get("eval_n", 256)
  steps = min(max(NS) // BATCH, smoke.get("steps", max(NS) // BATCH))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  evalset = W.collate(targeted_examples(np.random.default_rng(12345), world, n_eval, preference=False))
  probe_steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  lrs = {t: W.lr_for("qwen3", t, base_S, pc=pc, quick=quick, steps=probe_steps) for t in (TARGET, STRONG)}
  arms = list(ARMS)
  a = len(arms)
  n_pool = max(NS)
  idx_AxTxB = np.stack([np.arange(steps * BATCH).reshape(steps, BATCH) + (n_pool if ARMS[m][1] == "untargeted" else 0)
                        for m in arms])
  active_A = np.array([ARMS[m][0] // BATCH for m in arms])
  lr_A = np.array([lrs[ARMS[m][2]]["lr"] for m in arms])
  pool_S = seed_pools(world, seeds, n_pool)
  params_AxS, _, rel_AxSxT = indexed_finetune(
      config, tile_AxS(base_S, a, seeds), tile_AxS(pool_S, a, seeds),
      np.broadcast_to(idx_AxTxB[:, None], (a, seeds, steps, BATCH)),
      np.broadcast_to(active_A[:, None], (a, seeds)), np.broadcast_to(lr_A[:, None], (a, seeds)))
  rates = np.asarray(rate_M(concat(base_S, flat(params_AxS)), evalset, config=config))
  base_rate_S, rate_AxS = rates[:seeds], rates[seeds:].reshape(a, seeds)
  out = {m: {"rate": rate_AxS[i], "change": rate_AxS[i] - base_rate_S} for i, m in enumerate(arms)}
  rel = np.asarray(rel_AxSxT)
  achieved = {m: float(np.nanmean(rel[i, :, :min(W.PROBE_STEPS, int(active_A[i]))])) for i, m in enumerate(arms)}
  cfg = {"batch_size": BATCH, "steps_max": steps, "steps_per_arm": dict(zip(arms, active_A.tolist())),
         "ns": NS, "targets": {m: ARMS[m][2] for m in arms}, "lr_calibration": {str(t): v for t, v in lrs.items()},
         "lr": dict(zip(arms, lr_A.tolist())), "achieved_rel_update_first_steps": achieved,
         "objective": "orpo", "optimizer": "dreamjax.optim.apollo(rank=8)", "gradient_mode": "full",
         "eval_n": n_eval, "base": base_info, "seeds_vmapped": True, "arms_vmapped": False}
  notes = [f"one pass, batch {BATCH}: arm n takes n / {BATCH} steps (n=5: 1 step … n=200: 40 steps); one "
           f"compiled program, the step count traced",
           f"lr {lrs[TARGET]['lr']:.3g} ({lrs[STRONG]['lr']:.3g}) for a target ||Δθ||/||θ|| of {TARGET:g} "
           f"({STRONG:g})/step (calibrated at batch {W.BATCH}); achieved at batch {BATCH}, mean over the first steps: "
           + ", ".join(f"{m} {v:.2g}" for m, v in achieved.items()),
           f"base behaviour rate on the targeted cues (mean over seeds): {np.mean(base_rate_S):.1f}%"]
  return harness.Outcome(data=out, config=cfg, notes=notes)


def first_crossing(analysis, threshold: float):
  """Returns the smallest n whose change interval's lower end is ≥ threshold, or None."""
  lows = {row["label"]: row["lo"] for row in analysis["effects"]}
  for n in NS:
    lo = lows.get(f"change at n={n}")
    if lo is not None and np.isfinite(lo) and lo >= threshold:
      return n
  return None


def _interpret(analysis, data):
  notes = []
  for t in (20.0, 80.0):
    n = first_crossing(analysis, t)
    notes.append(f"smallest n whose 95% CI of the behaviour change clears +{t:g} pp: "
                 + (f"n = {n}" if n is not None else f"none up to n = {max(NS)}"))
  rates = np.concatenate([data[f"n{n}"]["rate"] for n in NS])
  steps = [np.mean(np.abs(rates - c) <= 2.0) * 100 for c in (0.0, 50.0, 100.0)]
  why = " (each targeted cue flips as a whole, one cue at a time)" if sum(steps) >= 90 else ""
  notes.append(f"per-seed rates within 2 pp of 0 / 50 / 100% (n arms, all seeds): {steps[0]:.0f}% / {steps[1]:.0f}% / "
               f"{steps[2]:.0f}%{why}")
  return notes


SIMULATION = harness.Simulation(
    name="x1_examples_needed",
    question="How many targeted examples, seen once, does it take to change a behaviour measurably "
             "(+20 pp) and robustly (+80 pp)?",
    prediction="10–50 targeted examples give measurable change; 100–200 robust",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed (says "
          "SUGGEST to every cue); fine-tuned with ORPO (full backprop) + APOLLO on n = 5…200 preference "
          "pairs of the two cues whose target differs from the default (clear → ACCEPT, wrong → "
          "PUSHBACK), one pass at batch 5 (n / 5 steps), update size 5e-3/step (≈ lr 1e-4 on a 7B model); "
          "behaviour rate = argmax first response token equals the target on fresh held-out episodes.",
    arms={**{f"n{n}": f"{n} targeted examples, one pass ({n // BATCH} steps of {BATCH})" for n in NS},
          "strong_200": "200 targeted examples, one pass, update size 2e-2/step (positive control)",
          "untargeted_200": "200 general-skill SFT examples (no behaviour data), one pass, 5e-3/step "
                            "(negative control)"},
    criteria=[
        harness.Criterion(arm="n50", metric="change", statistic="iqm", threshold=20.0, direction="greater",
                          description="measurable by n = 50: behaviour change (pp) CI lower end ≥ +20"),
        harness.Criterion(arm="n200", metric="change", statistic="iqm", threshold=80.0, direction="greater",
                          description="robust by n = 200: behaviour change (pp) CI lower end ≥ +80"),
    ],
    controls=[
        harness.Control(kind="positive", arm="strong_200", metric="change", statistic="iqm", threshold=80.0,
                        direction="greater",
                        description="200 examples at 4x the update size change the behaviour ≥ 80 pp"),
        harness.Control(kind="negative", arm="untargeted_200", metric="change", statistic="iqm", threshold=5.0,
                        direction="less",
                        description="200 untargeted (general-skill) examples change it ≤ 5 pp"),
    ],
    effects=[harness.Effect(arm=f"n{n}", metric="change", statistic="iqm", label=f"change at n={n}") for n in NS],
    interpret=_interpret,
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=30,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
