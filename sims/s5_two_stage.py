"""S5: a two-stage memory (fast context + slow consolidated weights) beats one stage.

A stream of fact updates arrives, one per round: K of the world's 16 entities get new values
(entity e_k's value changes from v_k to v'_k at round k). Each seed's cached base model (Qwen3-
style; it knows the old facts) follows the stream for R = K rounds of T train steps each (the
project's train step: ORPO, APOLLO, gradient_mode='frozen', one TrainState carried across
rounds, as in a dream cycle), in matched arms with the same steps and batch per round:

  single     (one stage) round k trains on the new fact k alone: every example is
             [header, FACT, e_k] → v'_k ≻ v_k (ORPO pair); no replay.
  two_stage  (two stages) the fast stage: a fresh fact is available in context at once (read back
             like context QA, no training); the slow stage: round k's examples are drawn over the
             memories by `dreamjax.dream.consolidate.ConsolidationSchedule().seed_weights(ages)`:
             the new facts that have arrived (age a = k − arrival) and the untouched old facts
             (consolidated memories, always older than `replay_cycles`). A fresh memory's share is
             fresh_share · decay^a / Σ_fresh decay^a', a consolidated one's (1 − fresh_share) / n_old.
             New facts are ORPO pairs as above; old facts are SFT replay ([header, FACT, e] → v_e).
  single_high the single-stage arm at 10× the update size (positive control for interference).
  two_stage_high the two-stage arm at 10× the update size (the comparison at a second operating
             point, where one stage learns each fact within its round).
  none       no training (the base model; negative control for recall).

Round k's pool holds P examples; memory m gets round(P · p_m) of them (largest remainder); the
T steps draw batches uniformly from that pool.

Metrics, per seed (accuracy = exact match of the greedy response, `world.correct_B`):
  recall           = acc(FACT e_k → v'_k) over the K new facts, context cleared (the query alone)
  recall_by_arrival = the same per arrival round k, [S, K]
  interference     = acc_old(base) − acc_old(final) in pp, on the 16 − K untouched old facts
  fast_recall      = acc of reading a new value back from the context (QA on the slot that holds
                     it) with the final model: the fast stage after the stream
Criteria: IQM(two_stage.recall) − IQM(single.recall) ≥ 0 and IQM(two_stage.interference) −
IQM(single.interference) ≤ 0, each decided on its 95% stratified-bootstrap interval.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.dream.consolidate import ConsolidationSchedule
from dreamjax.train.batch import TokenizedExample
from sims import engine
from sims import harness
from sims import world as W

N_NEW = 6  # new facts in the stream (rounds); the other 10 entities are the untouched old facts
POOL = 64  # examples per round's pool
TARGET = 2e-3  # per-step ||Δθ||/||θ|| of the main arms (≈ lr 4e-5 on a 7B model)
HIGH = 10.0  # update-size multiplier of the positive-control arm
GRADIENT_MODE = "frozen"
SCHEDULE = ConsolidationSchedule()  # replay_cycles=3, decay=0.5, fresh_share=0.75 (the defaults)
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}

TRAINED = ("single", "two_stage", "single_high", "two_stage_high")


class Plan:
  """One seed's stream: which entities change (in arrival order), their old and new values."""

  def __init__(self, world: W.World, rng: np.random.Generator, n_new: int):
    order = rng.permutation(W.N_ENTITIES)
    self.new_K = order[:n_new]
    self.old_N = np.sort(order[n_new:])
    facts = np.asarray(world.facts)
    self.old_value_K = facts[self.new_K]
    self.new_value_K = (self.old_value_K + 1 + rng.integers(0, W.N_VALUES - 1, n_new)) % W.N_VALUES
    self.facts = facts


def fact_query(rng, entity: int, value: int, rejected=None) -> TokenizedExample:
  """Returns [header, FACT, entity] → [value, EOS] (a preference pair when rejected is given)."""
  toks, _ = W.header(rng)
  rej = None if rejected is None else [W.VALUE0 + int(rejected), W.EOS]
  return TokenizedExample(context=toks + [W.FACT, W.ENTITY0 + int(entity)],
                          chosen=[W.VALUE0 + int(value), W.EOS], rejected=rej)


def in_context(rng, value: int) -> TokenizedExample:
  """Returns a context whose slot j holds `value`, asking for slot j: the fact read back from context."""
  toks, _ = W.header(rng)
  j = int(rng.integers(W.N_SLOTS))
  toks[4 + 2 * j] = W.VALUE0 + int(value)
  return TokenizedExample(context=toks + [W.QA, W.SLOT0 + j], chosen=[W.VALUE0 + int(value), W.EOS])


def quotas(p_N: np.ndarray, total: int) -> np.ndarray:
  """Returns integer counts summing to total, ∝ p (largest remainder)."""
  raw = p_N * total
  n = np.floor(raw).astype(int)
  n[np.argsort(-(raw - n), kind="stable")[: total - n.sum()]] += 1
  return n


def round_weights(plan: Plan, k: int, schedule: ConsolidationSchedule):
  """Returns (p over new facts [K], p over old facts [N]) of round k under the schedule.

  Memories are the new facts that have arrived (age k − arrival) and the old facts (age
  replay_cycles + k: consolidated before the stream started).
  """
  n_new, n_old = len(plan.new_K), len(plan.old_N)
  ages = np.concatenate([k - np.arange(k + 1), np.full(n_old, schedule.replay_cycles + k)])
  p = schedule.seed_weights(ages)
  p_new = np.zeros(n_new)
  p_new[: k + 1] = p[: k + 1]
  return p_new, p[k + 1:]


def round_pool(plan: Plan, k: int, arm: str, rng) -> list[TokenizedExample]:
  """Returns the POOL examples of round k for an arm (see module docstring)."""
  if arm.startswith("single"):
    p_new, p_old = np.eye(len(plan.new_K))[k], np.zeros(len(plan.old_N))
  else:
    p_new, p_old = round_weights(plan, k, SCHEDULE)
  n = quotas(np.concatenate([p_new, p_old]), POOL)
  out = []
  for i, c in enumerate(n[: len(p_new)]):
    out += [fact_query(rng, plan.new_K[i], plan.new_value_K[i], plan.old_value_K[i]) for _ in range(c)]
  for i, c in enumerate(n[len(p_new):]):
    e = plan.old_N[i]
    out += [fact_query(rng, e, plan.facts[e]) for _ in range(c)]
  return out


def stack(batches):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def seed_data(world: W.World, seed: int, n_eval: int):
  """Returns (plan, {arm: pools [R, P]}, {set: eval batch}) of one seed."""
  rng = np.random.default_rng([55, seed])
  plan = Plan(world, rng, N_NEW)
  pools = {arm: stack([W.collate(round_pool(plan, k, arm, rng)) for k in range(N_NEW)]) for arm in TRAINED}
  idx = np.arange(n_eval)
  new = [fact_query(rng, plan.new_K[i % N_NEW], plan.new_value_K[i % N_NEW]) for i in idx]
  old = [fact_query(rng, plan.old_N[i % len(plan.old_N)], plan.facts[plan.old_N[i % len(plan.old_N)]])
         for i in idx]
  fast = [in_context(rng, plan.new_value_K[i % N_NEW]) for i in idx]
  sets = {"new": W.collate(new), "old": W.collate(old), "fast": W.collate(fast)}
  return plan, pools, sets, idx % N_NEW


def stream(config, base_S, keys_S, pools_SxR, lr: float, steps: int):
  """Returns (params [S, ...], loss [S, R, T]): the R rounds of T steps, one train state carried across.

  Round r's step i trains on a batch of W.BATCH drawn uniformly from round r's pool with
  fold_in(key, r · T + i): one call of the suite's shared fine-tuning program (`sims.engine`,
  frozen mode) per round, each continuing the previous round's state.
  """
  rounds, n = pools_SxR.context_BxC.shape[1:3]
  state, losses = engine.init(base_S), []
  for r in range(rounds):
    idx = engine.sample_indices(keys_S, n, W.BATCH, start=r * steps)
    res = engine.run(config, state, engine.take(pools_SxR, (slice(None), r)), idx, engine.arm(steps, lr),
                     gradient_mode=GRADIENT_MODE)
    state = res.state
    losses.append(res.loss[:, :steps])
  return res.params, np.stack(losses, axis=1)


@functools.lru_cache(maxsize=None)
def _correct_fn(config):
  return jax.jit(jax.vmap(lambda p, b: W.correct_B(p, b, config=config)))


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  total = W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS
  steps = smoke.get("steps", total // N_NEW)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  n_eval = smoke.get("eval_n", 240)
  per_seed = [seed_data(world, s, n_eval) for s in range(seeds)]
  group_E = per_seed[0][3]
  sets_S = stack([d[2] for d in per_seed])
  lr = W.lr_for("qwen3", TARGET, base_S)
  lrs = {arm: lr["lr"] * (HIGH if arm.endswith("_high") else 1.0) for arm in TRAINED}
  keys_S = harness.seed_keys(key, seeds)
  correct = _correct_fn(config)
  acc_base_old = np.asarray(correct(base_S, sets_S["old"])).mean(1) * 100

  def metrics(params_S):
    c = {k: np.asarray(correct(params_S, sets_S[k])) for k in ("new", "old", "fast")}
    by_arrival_SxK = np.stack([c["new"][:, group_E == k].mean(1) * 100 for k in range(N_NEW)], axis=1)
    return {"recall": c["new"].mean(1) * 100, "recall_by_arrival": by_arrival_SxK,
            "interference": acc_base_old - c["old"].mean(1) * 100, "fast_recall": c["fast"].mean(1) * 100,
            "old_acc": c["old"].mean(1) * 100}

  out, final_loss = {"none": metrics(base_S)}, {}
  for arm in TRAINED:
    pools = stack([d[1][arm] for d in per_seed])
    params_S, loss_SxRxT = stream(config, base_S, keys_S, pools, lrs[arm], steps)
    out[arm] = metrics(params_S)
    final_loss[arm] = float(np.mean(np.asarray(loss_SxRxT)[:, :, -1]))
  shares = [round_weights(per_seed[0][0], k, SCHEDULE) for k in range(N_NEW)]
  cfg = {"new_facts": N_NEW, "rounds": N_NEW, "steps_per_round": steps, "total_steps": N_NEW * steps,
         "batch_size": W.BATCH, "pool_per_round": POOL, "objective": "orpo (new facts), sft (old-fact replay)",
         "gradient_mode": GRADIENT_MODE, "optimizer": "dreamjax.optim.apollo(rank=8)",
         "schedule": {"replay_cycles": SCHEDULE.replay_cycles, "decay": SCHEDULE.decay,
                      "fresh_share": SCHEDULE.fresh_share},
         "two_stage_new_fact_share_by_round": [float(p.sum()) for p, _ in shares],
         "two_stage_newest_fact_share_by_round": [float(p[k]) for k, (p, _) in enumerate(shares)],
         "lr_calibration": lr, "lr": lrs, "final_round_loss": final_loss, "eval_n": n_eval,
         "base": base_info, "model": str(config), "seeds_vmapped": True}
  notes = [f"lr {lr['lr']:.3g} for ||Δθ||/||θ|| {TARGET:g}/step (the _high arms: {lrs['single_high']:.3g}); "
           f"{N_NEW} rounds × {steps} steps × batch {W.BATCH} in every trained arm",
           "two-stage share of each round's examples on the new facts: " + ", ".join(
               f"{p.sum():.2f}" for p, _ in shares) + " (the rest replays the untouched old facts)",
           "base accuracy on the untouched old facts (mean over seeds): "
           f"{np.mean(acc_base_old):.1f}%; on the new values before training: {np.mean(out['none']['recall']):.1f}%"]
  for arm in TRAINED:
    notes.append(f"{arm}: mean recall by arrival round (first → last, %): " + ", ".join(
        f"{x:.0f}" for x in out[arm]["recall_by_arrival"].mean(0)))
  return harness.Outcome(data=out, config=cfg, notes=notes)


SIMULATION = harness.Simulation(
    name="s5_two_stage",
    question="When new facts arrive one at a time, does holding them in context and consolidating "
             "them into the weights by scheduled interleaved replay retain them better, with less "
             "interference with old facts, than training on each new fact directly as it arrives?",
    prediction="fast context + slow consolidated weights beats one stage: two-stage retention ≥ "
               "single-stage and interference lower",
    setup="sims.world, Qwen3-style tiny decoder pretrained per seed (knows 16 memorised facts). "
          f"A stream of {N_NEW} fact updates (entity → new value, one per round, entities and values "
          f"drawn per seed); per round the same number of steps (full: {W.FINETUNE_STEPS} in all, quick: "
          f"{W.QUICK_FINETUNE_STEPS // N_NEW * N_NEW}) of ORPO + "
          "APOLLO in frozen gradient mode, one TrainState across rounds. Two-stage draws each round's "
          "examples by ConsolidationSchedule(replay_cycles=3, decay=0.5, fresh_share=0.75)."
          "seed_weights over the arrived new facts and the untouched old facts (consolidated). "
          "Recall is measured with the context cleared (the FACT query alone).",
    arms={"single": "one stage: each round trains only on the fact that just arrived (no replay)",
          "two_stage": "fast stage in context; slow stage: each round's examples follow the consolidation "
                       "schedule's mixture of fresh new facts and older facts (interleaved replay)",
          "single_high": "one stage at 10× the update size (positive control: interference)",
          "two_stage_high": "two stages at 10× the update size (a second operating point)",
          "none": "no training, the base model (negative control: recall of the new values)"},
    criteria=[
        harness.Criterion(arm="two_stage", metric="recall", statistic="iqm_diff", baseline="single",
                          threshold=0.0, direction="greater",
                          description="retention: IQM(two_stage.recall) − IQM(single.recall) ≥ 0 pp "
                                      "(new facts, context cleared)"),
        harness.Criterion(arm="two_stage", metric="interference", statistic="iqm_diff", baseline="single",
                          threshold=0.0, direction="less",
                          description="interference: IQM(two_stage.interference) − IQM(single.interference) "
                                      "≤ 0 pp (old-fact accuracy drop; lower is better)"),
    ],
    controls=[
        harness.Control(kind="positive", arm="single_high", metric="interference", statistic="iqm",
                        threshold=5.0, direction="greater",
                        description="one stage at 10× the update size drops old-fact accuracy by > 5 pp"),
        harness.Control(kind="negative", arm="none", metric="recall", statistic="iqm", threshold=12.5,
                        direction="less",
                        description="untrained base recalls the new values at most at 2× chance (12.5%)"),
    ],
    effects=[
        harness.Effect(arm="two_stage", metric="recall", statistic="iqm"),
        harness.Effect(arm="single", metric="recall", statistic="iqm"),
        harness.Effect(arm="two_stage", metric="interference", statistic="iqm"),
        harness.Effect(arm="single", metric="interference", statistic="iqm"),
        harness.Effect(arm="two_stage", metric="recall_by_arrival", statistic="iqm_diff", baseline="single",
                       label="recall by arrival round, two_stage − single (pooled over rounds)"),
        harness.Effect(arm="two_stage", metric="fast_recall", statistic="iqm",
                       label="fast stage: in-context read-back of the new values after the stream"),
        harness.Effect(arm="two_stage", metric="recall", statistic="prob_improvement", baseline="single"),
        harness.Effect(arm="two_stage_high", metric="recall", statistic="iqm_diff", baseline="single_high"),
        harness.Effect(arm="two_stage_high", metric="interference", statistic="iqm_diff", baseline="single_high"),
    ],
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=38,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
