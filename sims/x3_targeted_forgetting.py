"""X3: forgetting hits the skills a fine-tune does not practise; ~25% general replay prevents it.

Each seed's cached Qwen3-style base (`sims.world.pretrain`) has three general skills, context QA
(qa), modular arithmetic (arith) and memorised facts (fact). A new behaviour is learned from a
pool of POOL examples: a fraction r of general replay (SFT examples of the three skills in equal
thirds) and, for the rest, the new behaviour's own data, which "use" two of the skills: 2/3
behaviour preference pairs (`world.behaviour_example`) and 1/3 SFT examples of the two practised
skills (half each). The third skill is never practised (except through replay). Training is the
project's ORPO objective, full-backprop train step and APOLLO optimizer, STEPS steps of batch
BATCH drawn with replacement, matched draws across arms (the same index table per seed).

Arms (one compiled program, seeds vmapped; pools and index tables are traced):
  r0, r5, r10, r25, r50      qa unpractised (the behaviour data practise arith and fact), replay r %
  fact_free_r0, arith_free_r0  the unpractised skill rotated to fact / arith, replay 0

Each arm then continues as a second job (fresh optimizer state, same lr) for RECOVERY_STEPS steps
of batch BATCH drawn from 10 examples of its unpractised skill: recovery from 10 examples.

Metrics, per seed (exact-match accuracy %, `world.accuracies`, fresh held-out sets):
  forgetting_k      = acc_k(base) − acc_k(after fine-tune) for k ∈ (qa, arith, fact)  [S, 3]
  mean_forgetting   = mean_k forgetting_k
  forget_unpractised, forget_practised = forgetting of the unpractised skill; mean over the other two
  targeting_k       = forgetting_k(the r0 arm where k is unpractised)
                      − mean of forgetting_k over the two r0 arms where k is practised   [S, 3]
                      (a within-skill, seed-paired contrast: skill difficulty cancels)
  recovered         = acc_u(after recovery) − acc_u(after fine-tune), u the unpractised skill
  residual          = acc_u(base) − acc_u(after recovery)
  behaviour         = exact-match accuracy of the new behaviour (held-out, all cues)
Criteria: mean(targeting) > 0 (interval above 0; strata = skills) and mean(mean_forgetting at 25% replay) ≤ 1 pp.
The smallest sufficient replay ratio (interval of mean forgetting ≤ 1 pp) is read off the
per-ratio intervals (`interpret`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from sims import harness
from sims import world as W
from sims.x1_examples_needed import (exact_match_M, flat, indexed_finetune, stack_sets, stacked_accuracies,
                                     tile_AxS)

TARGET = 1e-2  # per-step ||Δθ||/||θ|| (≈ lr 2e-4 on a 7B model)
POOL = 1024  # examples per arm's pool
BATCH = 8
RECOVERY_EXAMPLES, RECOVERY_STEPS = 10, 10
BEHAVIOUR_SHARE = 2 / 3  # of the new-behaviour data; the rest practises the two practised skills
RATIOS = (0, 5, 10, 25, 50)  # general replay, % of the pool
POOL_SEED, ORDER_SEED = 803, 8030
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}

# arm -> (unpractised skill, replay %)
ARMS = {f"r{r}": ("qa", r) for r in RATIOS}
ARMS["fact_free_r0"] = ("fact", 0)
ARMS["arith_free_r0"] = ("arith", 0)
ROTATION = {"qa": "r0", "fact": "fact_free_r0", "arith": "arith_free_r0"}  # the r0 arm leaving k unpractised


def arm_pool(unpractised: str, replay_pct: int, lists: dict) -> list:
  """Returns POOL examples: replay thirds, then behaviour pairs and the practised skills' SFT examples."""
  n_rep = int(round(POOL * replay_pct / 100))
  n_beh = int(round((POOL - n_rep) * BEHAVIOUR_SHARE))
  n_pra = POOL - n_rep - n_beh
  practised = [k for k in W.SKILLS if k != unpractised]
  replay = [lists["replay"][W.SKILLS[i % 3]][i // 3] for i in range(n_rep)]
  practise = [lists["practise"][practised[i % 2]][i // 2] for i in range(n_pra)]
  recovery = lists["recovery"][unpractised][:RECOVERY_EXAMPLES]
  return replay + lists["behaviour"][:n_beh] + practise + recovery


def example_lists(world: W.World) -> dict:
  """Returns the fixed example lists every arm's pool is cut from (nested across arms)."""
  rng = np.random.default_rng(POOL_SEED)
  return {"behaviour": W.examples("behaviour", POOL, rng, world, preference=True),
          "practise": {k: W.examples(k, POOL, rng, world) for k in W.SKILLS},
          "replay": {k: W.examples(k, POOL, rng, world) for k in W.SKILLS},
          "recovery": {k: W.examples(k, RECOVERY_EXAMPLES, rng, world) for k in W.SKILLS}}


def index_tables(seeds: int, steps: int, recovery_steps: int):
  """Returns [S, steps + recovery_steps, BATCH]: uniform draws (with replacement) from the pool, then
  BATCH distinct ones per step from the 10 recovery examples (stored at POOL … POOL + 9)."""
  out = []
  for s in range(seeds):
    rng = np.random.default_rng([ORDER_SEED, s])
    main = rng.integers(0, POOL, (steps, BATCH))
    rec = POOL + np.stack([rng.permutation(RECOVERY_EXAMPLES)[:BATCH] for _ in range(recovery_steps)])
    out.append(np.concatenate([main, rec.reshape(recovery_steps, BATCH)]))
  return np.stack(out)


def run(seeds: int, quick: bool, key):
  del key  # pools and draw order come from numpy streams (POOL_SEED, ORDER_SEED, seed): matched across arms
  smoke = SMOKE or {}
  steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  rec_steps = min(RECOVERY_STEPS, smoke.get("steps", RECOVERY_STEPS))
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  sets = W.eval_sets(world, n=smoke.get("eval_n", 256))
  lists = example_lists(world)
  arms = list(ARMS)
  a = len(arms)
  pools = [W.collate(arm_pool(*ARMS[m], lists)) for m in arms]
  pool_A = jax.tree.map(lambda *xs: jnp.stack(xs), *pools)
  lr = W.lr_for("qwen3", TARGET, base_S, pc=pc, quick=quick, steps=steps)
  idx_SxTxB = index_tables(seeds, steps, rec_steps)
  total = steps + rec_steps
  params_AxS, snap_AxS, rel_AxSxT = indexed_finetune(
      config, tile_AxS(base_S, a, seeds), tile_AxS(pool_A, a, seeds, seeds_first=False),
      np.broadcast_to(idx_SxTxB[None], (a, *idx_SxTxB.shape)), np.full((a, seeds), total),
      np.full((a, seeds), lr["lr"]), np.full((a, seeds), steps))
  acc_base, acc_ft = stacked_accuracies([base_S, flat(snap_AxS)], sets, config)
  acc_ft = {k: v.reshape(a, seeds) for k, v in acc_ft.items()}
  own_AxS = tile_AxS(stack_sets({m: sets[ARMS[m][0]] for m in arms}), a, seeds, seeds_first=False)
  acc_rec_AxS = np.asarray(exact_match_M(flat(params_AxS), flat(own_AxS), config=config)).reshape(a, seeds)
  out = {}
  for i, m in enumerate(arms):
    u = ARMS[m][0]
    forgetting_SxK = np.stack([acc_base[k] - acc_ft[k][i] for k in W.SKILLS], axis=1)
    ui = W.SKILLS.index(u)
    out[m] = {"forgetting": forgetting_SxK, "mean_forgetting": forgetting_SxK.mean(1),
              "forget_unpractised": forgetting_SxK[:, ui],
              "forget_practised": np.delete(forgetting_SxK, ui, axis=1).mean(1),
              "behaviour": acc_ft["behaviour"][i],
              "recovered": acc_rec_AxS[i] - acc_ft[u][i], "residual": acc_base[u] - acc_rec_AxS[i]}
  targeting = []
  for j, k in enumerate(W.SKILLS):
    practised = [ROTATION[o] for o in W.SKILLS if o != k]
    targeting.append(out[ROTATION[k]]["forgetting"][:, j] - np.mean([out[m]["forgetting"][:, j] for m in practised], 0))
  out["r0"]["targeting"] = np.stack(targeting, axis=1)
  out["r0"].update({f"targeting_{k}": t for k, t in zip(W.SKILLS, targeting)})
  rel = np.asarray(rel_AxSxT)
  cfg = {"steps": steps, "recovery_steps": rec_steps, "recovery_examples": RECOVERY_EXAMPLES, "batch_size": BATCH,
         "pool": POOL, "behaviour_share": BEHAVIOUR_SHARE, "ratios_pct": RATIOS, "arms": ARMS,
         "objective": "orpo", "optimizer": "dreamjax.optim.apollo(rank=8)", "gradient_mode": "full",
         "lr_calibration": lr, "achieved_rel_update_first_steps": float(np.nanmean(rel[:, :, :W.PROBE_STEPS])),
         "base_acc": {k: float(np.mean(v)) for k, v in acc_base.items()}, "base": base_info,
         "seeds_vmapped": True, "arms_vmapped": False}
  notes = [f"lr {lr['lr']:.3g} for ||Δθ||/||θ|| {TARGET:g}/step (calibrated at batch {W.BATCH}); achieved at "
           f"batch {BATCH}, mean over the first {W.PROBE_STEPS} steps: {cfg['achieved_rel_update_first_steps']:.2g}",
           "base accuracy (mean over seeds, %): " + ", ".join(f"{k} {np.mean(v):.1f}" for k, v in acc_base.items()),
           f"recovery: {rec_steps} steps of batch {BATCH} drawn from {RECOVERY_EXAMPLES} examples of the "
           "unpractised skill, fresh optimizer state, same lr"]
  return harness.Outcome(data=out, config=cfg, notes=notes)


def smallest_sufficient(analysis, limit: float = 1.0):
  """Returns the smallest replay % whose mean-forgetting interval's upper end is ≤ limit, or None."""
  his = {row["label"]: row["hi"] for row in analysis["effects"]}
  for r in RATIOS:
    hi = his.get(f"mean forgetting at {r}% replay")
    if hi is not None and np.isfinite(hi) and hi <= limit:
      return r
  return None


def _interpret(analysis, data):
  r = smallest_sufficient(analysis)
  notes = ["smallest replay ratio whose 95% CI of mean forgetting is ≤ 1 pp: "
           + (f"{r}%" if r is not None else f"none up to {max(RATIOS)}%")]
  per = np.mean(data["r0"]["targeting"], axis=0)
  notes.append("targeting (forgetting when unpractised − when practised, mean over seeds, pp): "
               + ", ".join(f"{k} {v:+.1f}" for k, v in zip(W.SKILLS, per)))
  return notes


SIMULATION = harness.Simulation(
    name="x3_targeted_forgetting",
    question="Does fine-tuning forget the skills its data do not practise more than those it does, and does "
             "~25% general replay prevent the forgetting?",
    prediction="forgetting hits what is not practised; ~25% general replay prevents it",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed on qa, arith, "
          "fact and the default behaviour; fine-tuned with ORPO (full backprop) + APOLLO on pools of 1024: "
          "r% general replay (skills in thirds) + new-behaviour data (2/3 behaviour preference pairs, 1/3 SFT "
          "examples of two practised skills), batch 8, update size 1e-2/step (≈ lr 2e-4 on a 7B model); "
          "then 10 recovery steps on 10 examples of the unpractised skill.",
    arms={**{f"r{r}": f"qa unpractised (arith, fact practised), {r}% replay" for r in RATIOS},
          "fact_free_r0": "fact unpractised (qa, arith practised), 0% replay",
          "arith_free_r0": "arith unpractised (qa, fact practised), 0% replay"},
    criteria=[
        harness.Criterion(arm="r0", metric="targeting", statistic="mean", threshold=0.0, direction="greater",
                          description="a skill forgets more when unpractised than when practised (seed-paired, "
                                      "within skill, mean over skills with the bootstrap stratified by skill, so "
                                      "no skill is trimmed away; interval above 0)"),
        harness.Criterion(arm="r25", metric="mean_forgetting", statistic="mean", threshold=1.0, direction="less",
                          description="25% replay: mean forgetting over the skills ≤ 1 pp (interval upper end)"),
    ],
    controls=[
        harness.Control(kind="positive", arm="r0", metric="forget_unpractised", statistic="iqm", threshold=5.0,
                        direction="greater",
                        description="without replay the unpractised skill forgets ≥ 5 pp (there is forgetting "
                                    "to target and to prevent)"),
        harness.Control(kind="positive", arm="r25", metric="behaviour", statistic="iqm", threshold=80.0,
                        direction="greater",
                        description="with 25% replay the new behaviour is still learned (≥ 80%), so no "
                                    "forgetting is not just no learning"),
    ],
    effects=[
        *[harness.Effect(arm=f"r{r}", metric="mean_forgetting", statistic="mean",
                         label=f"mean forgetting at {r}% replay") for r in RATIOS],
        *[harness.Effect(arm="r0", metric=f"targeting_{k}", statistic="iqm",
                         label=f"targeting, {k}: unpractised − practised forgetting (pp)") for k in W.SKILLS],
        harness.Effect(arm="r0", metric="forget_unpractised", statistic="iqm_diff",
                       baseline_metric="forget_practised", label="r0: unpractised − practised forgetting (pp)"),
        harness.Effect(arm="r0", metric="recovered", statistic="iqm", label="r0: recovered from 10 examples (pp)"),
        harness.Effect(arm="r0", metric="residual", statistic="iqm", label="r0: forgetting left after recovery (pp)"),
        harness.Effect(arm="r0", metric="behaviour", statistic="iqm"),
    ],
    amendment="Disclosed change before the first full run: at update size 5e-3/step (the suite's usual 'high' "
              "arm) the positive control (no replay forgets the unpractised skill ≥ 5 pp) was INCONCLUSIVE in a "
              "4-seed development run, so the manipulation was strengthened to 1e-2/step. Also before the first "
              "full run, after a quick run: the targeting criterion's statistic became the mean (strata = skills) "
              "instead of the IQM, since the IQM of the pooled seed×skill values trims away most of the one "
              "skill that forgets. No threshold changed.",
    interpret=_interpret,
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=85,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
