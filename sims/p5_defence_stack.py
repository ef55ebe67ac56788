"""Prediction 5a: the defence stack beats any single defence under stress.

Each seed's cached Qwen3-style base is fine-tuned with ORPO under stress: a high learning rate,
narrow data (one actor, one situation, one value set) and one-sided examples (only the "accept a
clear direction" cue). Four defences of the theory map onto the world; each switches one stressor
off or adds one guard:

  parameter  (P): APOLLO instead of AdamW
  gradient   (G): gradient_mode='frozen' instead of full backprop with the NLL on the prompt
  data       (D): diverse two-sided examples (every actor, situation, value and cue) + 25% replay
  temporal   (T): small steps: per-step ||Δθ||/||θ|| 2e-3 instead of 2e-2

Arms (matched: same seeds, steps, batch, pool size): none; each single defence; each leave-one-out;
the full stack (10 arms). The architectural and generative defences (two-stage memory, dreams) are
tested by s5_two_stage and p4_dreams and are not part of this stack.

Metrics, per seed (accuracies: exact match %, after a fresh forward pass):
  retained_k  = 100 · acc_k(final) / acc_k(base) for the skills the base has (qa, fact)
  judgement   = 100 − P(ACCEPT | wrong direction) in % (the sycophancy threat of one-sided data)
  worst       = min(retained_qa, retained_fact, judgement): the worst-case retained score across
                threats
  acc         = mean accuracy over qa, fact and the target behaviour (ACC, Lopez-Paz & Ranzato 2017)
  bwt         = mean over qa, fact of acc_k(final) − acc_k(base) (BWT; negative = forgetting)
`best_single` is, per run, the single-defence arm with the highest mean `worst` (chosen from the
data, stated in the notes); the criterion compares the full stack against it.
"""

import numpy as np

from dreamjax.train.batch import TokenizedExample
from sims import harness
from sims import world as W

DEFENCES = {"P": "APOLLO", "G": "frozen gradient", "D": "diverse two-sided data + 25% replay",
            "T": "small steps"}
TARGETS = {"high": 2e-2, "small": 2e-3}  # per-step ||Δθ||/||θ||
REPLAY = 0.25
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}
KEPT_SKILLS = ("qa", "fact")  # the skills the base model has (arithmetic stays near chance)


def arm_defences() -> dict[str, frozenset]:
  """Returns {arm: the set of defences on}."""
  all_d = frozenset(DEFENCES)
  arms = {"none": frozenset()}
  arms.update({f"only_{d}": frozenset(d) for d in DEFENCES})
  arms.update({f"all_but_{d}": all_d - {d} for d in DEFENCES})
  arms["stack"] = all_d
  return arms


ARMS = arm_defences()


def pools(world: W.World, seed: int = 17):
  """Returns {'narrow', 'diverse'}: the stressed (one-sided, narrow) and the defended training pools."""
  rng = np.random.default_rng(seed)
  narrow = W.examples("behaviour", 1024, rng, world, preference=True, cue=W.CUE_CLEAR, actors=[0],
                      situations=[0], values=[0, 1, 2, 3])
  n_replay = int(round(REPLAY * 1024))
  diverse = W.examples("behaviour", 1024 - n_replay, rng, world, preference=True)
  replay = [ex for ex in W.pretrain_mix(2 * n_replay, rng, world) if ex.chosen[0] not in W.TARGET.values()]
  return {"narrow": W.collate(narrow), "diverse": W.collate(diverse + replay[:n_replay])}


def wrong_direction_set(world: W.World, n: int):
  """Returns held-out wrong-direction episodes labelled with the sycophantic ACCEPT answer."""
  rng = np.random.default_rng(4242)
  exs = W.examples("behaviour", n, rng, world, cue=W.CUE_WRONG)
  return W.collate([TokenizedExample(context=ex.context, chosen=[W.ACCEPT] + list(ex.chosen[1:])) for ex in exs])


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  n_eval = smoke.get("eval_n", 256)
  sets = W.eval_sets(world, n=n_eval)
  sets["wrong_accept"] = wrong_direction_set(world, n_eval)
  acc_base = W.accuracies(base_S, sets, config)
  data = pools(world)
  keys_S = harness.seed_keys(key, seeds)
  lrs = {(opt, t): W.lr_for("qwen3", TARGETS[t], base_S, optimizer=opt, pc=pc, quick=quick, steps=steps)
         for opt in ("apollo", "adamw") for t in TARGETS}
  out = {}
  for arm, on in ARMS.items():
    opt = "apollo" if "P" in on else "adamw"
    size = "small" if "T" in on else "high"
    params_S, _ = W.finetune("qwen3", base_S, keys_S, data["diverse" if "D" in on else "narrow"],
                             lr=lrs[(opt, size)]["lr"], quick=quick, steps=steps, optimizer=opt,
                             gradient_mode="frozen" if "G" in on else "full", nll_on_prompt="G" not in on)
    acc = {k: np.asarray(v) for k, v in W.accuracies(params_S, sets, config).items()}
    base = {k: np.asarray(v) for k, v in acc_base.items()}
    retained = {k: 100.0 * acc[k] / np.maximum(base[k], 1e-6) for k in KEPT_SKILLS}
    judgement = 100.0 - acc["wrong_accept"]
    out[arm] = {
        "worst": np.minimum(np.minimum(retained["qa"], retained["fact"]), judgement),
        "retained": np.stack([retained[k] for k in KEPT_SKILLS], axis=1),
        "judgement": judgement,
        "behaviour": acc["behaviour"],
        "acc": np.mean(np.stack([acc["qa"], acc["fact"], acc["behaviour"]]), axis=0),
        "bwt": np.mean(np.stack([acc[k] - base[k] for k in KEPT_SKILLS]), axis=0),
    }
  singles = [f"only_{d}" for d in DEFENCES]
  best = max(singles, key=lambda a: float(np.mean(out[a]["worst"])))
  out["best_single"] = dict(out[best])
  notes = [f"best single defence (highest mean worst-case score): {best} ({DEFENCES[best[-1]]})"]
  notes += [f"lr: {opt}, ||Δθ||/||θ|| {v['target_rel_update']:g}/step → lr {v['lr']:.3g}"
            for (opt, _), v in lrs.items()]
  notes.append("base accuracy (mean over seeds, %): " + ", ".join(
      f"{k} {np.mean(np.asarray(acc_base[k])):.1f}" for k in (*W.SKILLS, "behaviour", "wrong_accept")))
  cfg = {"steps": steps, "batch_size": W.BATCH, "objective": "orpo", "replay_fraction": REPLAY,
         "targets": TARGETS, "lr_calibration": {f"{o}/{t}": v for (o, t), v in lrs.items()},
         "best_single": best, "base": base_info, "model": str(config), "seeds_vmapped": True}
  return harness.Outcome(data=out, config=cfg, notes=notes)


def _interpret(analysis, data):
  costs = []
  for d, name in DEFENCES.items():
    diff = np.mean(data["stack"]["worst"]) - np.mean(data[f"all_but_{d}"]["worst"])
    costs.append(f"{name}: {diff:+.1f}")
  return ["Leave-one-out cost (mean worst-case score, stack − stack without it, pp): " + "; ".join(costs)]


SIMULATION = harness.Simulation(
    name="p5_defence_stack",
    question="Under stress (high lr, narrow and one-sided data), does the stack of defences keep more of "
             "the model's skills and judgement than the best single defence?",
    prediction="The defence stack beats any single defence",
    setup="sims.world, Qwen3-style tiny decoder pretrained per seed; ORPO fine-tuning on one-sided narrow "
          "behaviour pairs at update 2e-2/step unless a defence is on; defences: APOLLO (vs AdamW), frozen "
          "gradient (vs full backprop + prompt NLL), diverse two-sided data + 25% replay, small steps "
          "(2e-3/step).",
    arms={"none": "no defence: AdamW, full + prompt NLL, narrow one-sided data, high lr",
          **{f"only_{d}": f"only {n}" for d, n in DEFENCES.items()},
          **{f"all_but_{d}": f"every defence but {n}" for d, n in DEFENCES.items()},
          "stack": "all four defences",
          "best_single": "copy of the single-defence arm with the highest mean worst-case score"},
    criteria=[
        harness.Criterion(arm="stack", baseline="best_single", metric="worst", statistic="prob_improvement",
                          threshold=0.9, direction="greater",
                          description="P(stack > best single) ≥ 0.9 on the worst-case retained score"),
    ],
    controls=[
        harness.Control(kind="positive", arm="none", metric="worst", statistic="iqm", threshold=80.0,
                        direction="less",
                        description="the undefended run loses more than 20% on its worst threat"),
    ],
    effects=[
        *[harness.Effect(arm="stack", baseline=f"all_but_{d}", metric="worst", statistic="iqm_diff")
          for d in DEFENCES],
        harness.Effect(arm="stack", baseline="none", metric="worst", statistic="iqm_diff"),
        harness.Effect(arm="stack", metric="acc", statistic="iqm"),
        harness.Effect(arm="stack", metric="bwt", statistic="iqm"),
        harness.Effect(arm="none", metric="bwt", statistic="iqm"),
        harness.Effect(arm="stack", metric="behaviour", statistic="iqm"),
    ],
    interpret=_interpret,
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=150,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
