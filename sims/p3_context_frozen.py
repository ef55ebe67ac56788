"""Prediction 3: context-frozen training changes responses without hurting context understanding.

Each seed's cached base model of each family (Qwen3-style dense; Qwen3.5-style hybrid with a
Gated DeltaNet layer) is fine-tuned with ORPO and APOLLO on diverse behaviour preference pairs
(no replay, so the gradient mode is the only defence) in three matched arms per family:

  full:      gradient_mode='full' with the NLL also on prompt tokens (TRL's ORPO default)
  mask:      gradient_mode='full', loss on response tokens only (loss-mask-only)
  frozen:    gradient_mode='frozen' (context prefilled under stop_gradient)

Metrics, per seed (accuracies are exact-match %, after a fresh forward pass of context+response):
  behaviour_change = acc_behaviour(final) − acc_behaviour(base)
  qa_drop          = acc_qa(base) − acc_qa(final)
  skill_drop       = acc_k(base) − acc_k(final) for k ∈ (qa, arith, fact); [S, 3]
  cka              = linear CKA between base and final context encodings (final residual stream
                     at the last context token, on held-out QA contexts)
  probe_drop       = probe_acc(base) − probe_acc(final): a ridge linear probe (`world.
                     linear_probe_accuracy`) decoding the asked-for slot value from those encodings
A positive control corrupts context reading on purpose (Qwen3 family, full mode, QA pairs whose
chosen answer is a wrong slot's value) and must drop QA by more than 5 pp.
"""

import jax
import numpy as np

from dreamjax.train.batch import TokenizedExample
from sims import harness
from sims import world as W

TARGET = 2e-3  # per-step ||Δθ||/||θ|| (≈ lr 4e-5 on a 7B model)
SMOKE = None  # tests set e.g. {'steps': 3, 'pretrain_steps': 5, 'eval_n': 16}
# Qwen3.5 first: run beside the other simulations (all Qwen3), its base pretrains while theirs does.
PREFIX = {"qwen3_5": "q35", "qwen3": "q3"}
MODES = {"full": ("full", True), "mask": ("full", False), "frozen": ("frozen", False)}


def corrupt_qa_pool(world: W.World, n: int, rng):
  """Returns QA preference pairs that teach reading the wrong slot: chosen wrong, rejected right."""
  out = []
  for ex in W.examples("qa", n, rng, world):
    right = ex.chosen[0]
    wrong = W.VALUE0 + (right - W.VALUE0 + 1 + int(rng.integers(W.N_VALUES - 1))) % W.N_VALUES
    out.append(TokenizedExample(context=ex.context, chosen=[wrong, W.EOS], rejected=list(ex.chosen)))
  return W.collate(out)


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  world = W.World.make(pc.world_seed)
  sets = W.eval_sets(world, n=smoke.get("eval_n", 256))
  rng = np.random.default_rng(11)
  pool = W.collate(W.examples("behaviour", 1024, rng, world, preference=True))
  corrupt = corrupt_qa_pool(world, 1024, rng)
  keys_S = harness.seed_keys(key, seeds)
  out, cfg, notes = {}, {"steps": steps, "batch_size": W.BATCH, "objective": "orpo",
                         "optimizer": "dreamjax.optim.apollo(rank=8)", "seeds_vmapped": True,
                         "families": {}}, []
  for family, prefix in PREFIX.items():
    config = W.model_config(family)
    base_S, base_info = W.pretrain(family, seeds, pc)
    acc_base = W.accuracies(base_S, sets, config)
    lr = W.lr_for(family, TARGET, base_S, pc=pc, quick=quick, steps=steps)
    feats_base = jax.vmap(lambda p: W.context_features(p, sets["qa"], config=config))(base_S)
    labels = sets["qa"].chosen_BxR[:, 0] - W.VALUE0  # the value the QA context asks for
    probe = jax.vmap(lambda f: W.linear_probe_accuracy(f, labels, W.N_VALUES))
    probe_base = probe(feats_base)
    arms = {f"{prefix}_{m}": (pool,) + MODES[m] for m in MODES}
    if family == "qwen3":
      arms["q3_corrupt"] = (corrupt, "full", False)
    for arm, (data, mode, nll_on_prompt) in arms.items():
      params_S, _ = W.finetune(family, base_S, keys_S, data, lr=lr["lr"], quick=quick, steps=steps,
                               gradient_mode=mode, nll_on_prompt=nll_on_prompt)
      acc = W.accuracies(params_S, sets, config)
      feats = jax.vmap(lambda p: W.context_features(p, sets["qa"], config=config))(params_S)
      out[arm] = {
          "behaviour_change": np.asarray(acc["behaviour"] - acc_base["behaviour"]),
          "qa_drop": np.asarray(acc_base["qa"] - acc["qa"]),
          "skill_drop": np.stack([np.asarray(acc_base[k] - acc[k]) for k in W.SKILLS], axis=1),
          "cka": np.asarray(jax.vmap(W.linear_cka)(feats_base, feats)),
          "probe_drop": np.asarray(probe_base - probe(feats)),
      }
    cfg["families"][family] = {"lr_calibration": lr, "base": base_info, "model": str(config)}
    notes.append(f"{family}: base accuracy (mean over seeds, %): " + ", ".join(
        f"{k} {np.mean(np.asarray(acc_base[k])):.1f}" for k in (*W.SKILLS, "behaviour"))
        + f"; lr {lr['lr']:.3g} for ||Δθ||/||θ|| {TARGET:g}/step")
  notes.append("Linear probe: a ridge probe fit on half of the held-out QA contexts' encodings decodes the "
               "asked-for value on the other half; probe_drop = base accuracy − fine-tuned accuracy (pp).")
  return harness.Outcome(data=out, config=cfg, notes=notes)


def _family_rules(prefix: str, family: str):
  return [
      harness.Criterion(arm=f"{prefix}_frozen", metric="behaviour_change", statistic="iqm_ratio",
                        baseline=f"{prefix}_full", threshold=0.9, direction="greater",
                        description=f"{family}: frozen keeps ≥ 90% of full's behaviour change"),
      harness.Criterion(arm=f"{prefix}_frozen", metric="qa_drop", statistic="iqm", threshold=1.0,
                        direction="less", description=f"{family}: frozen's context-QA drop ≤ 1 pp"),
  ]


SIMULATION = harness.Simulation(
    name="p3_context_frozen",
    question="Does training with the context frozen (no gradient into how the context is encoded) "
             "change the responses as much as full backprop while leaving context QA intact?",
    prediction="Context-frozen training will change response patterns without degrading context "
               "understanding",
    setup="sims.world; two families of tiny decoders (Qwen3-style: 2 attention layers; "
          "Qwen3.5-style: Gated DeltaNet + gated attention), d=48, vocab 64, pretrained per seed; "
          "ORPO + APOLLO on diverse behaviour pairs, per-step ||Δθ||/||θ|| = 2e-3; context QA "
          "evaluated after a fresh forward pass.",
    arms={**{f"{p}_full": f"{f}: full backprop, NLL on prompt + response" for f, p in PREFIX.items()},
          **{f"{p}_mask": f"{f}: full backprop, loss on the response only" for f, p in PREFIX.items()},
          **{f"{p}_frozen": f"{f}: gradient_mode='frozen'" for f, p in PREFIX.items()},
          "q3_corrupt": "qwen3: full backprop on QA pairs preferring a wrong slot's value "
                        "(positive control for the QA metric)"},
    criteria=_family_rules("q3", "qwen3") + _family_rules("q35", "qwen3_5"),
    controls=[
        harness.Control(kind="positive", arm="q3_mask", metric="behaviour_change", statistic="iqm",
                        threshold=30.0, direction="greater",
                        description="full backprop (response-only loss) changes the behaviour by more than 30 pp"),
        harness.Control(kind="positive", arm="q3_corrupt", metric="qa_drop", statistic="iqm",
                        threshold=5.0, direction="greater",
                        description="training to misread the context drops QA by more than 5 pp"),
    ],
    effects=[
        harness.Effect(arm="q3_mask", metric="qa_drop", statistic="iqm"),
        harness.Effect(arm="q3_full", metric="qa_drop", statistic="iqm"),
        harness.Effect(arm="q35_full", metric="qa_drop", statistic="iqm"),
        harness.Effect(arm="q35_mask", metric="qa_drop", statistic="iqm"),
        harness.Effect(arm="q3_frozen", metric="behaviour_change", statistic="iqm_ratio", baseline="q3_mask"),
        harness.Effect(arm="q35_frozen", metric="behaviour_change", statistic="iqm_ratio", baseline="q35_mask"),
        harness.Effect(arm="q3_frozen", metric="cka", statistic="iqm_diff", baseline="q3_full"),
        harness.Effect(arm="q35_frozen", metric="cka", statistic="iqm_diff", baseline="q35_full"),
        harness.Effect(arm="q3_frozen", metric="probe_drop", statistic="iqm"),
        harness.Effect(arm="q3_full", metric="probe_drop", statistic="iqm"),
        harness.Effect(arm="q35_frozen", metric="probe_drop", statistic="iqm"),
        harness.Effect(arm="q35_full", metric="probe_drop", statistic="iqm"),
        harness.Effect(arm="q3_frozen", metric="skill_drop", statistic="iqm"),
        harness.Effect(arm="q35_frozen", metric="skill_drop", statistic="iqm"),
    ],
    amendment="Before the first full run: the positive control for the behaviour metric read the 'full' arm, "
              "whose NLL on the prompt tokens (TRL's default) competes with the behaviour and moved it less than "
              "the other arms in development runs; the control now reads the 'mask' arm (full backprop, loss on "
              "the response only), the arm whose job is to show the behaviour can change. The prediction's "
              "criteria are unchanged (frozen vs 'full'); frozen vs 'mask' is reported as an effect.",
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=261,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
