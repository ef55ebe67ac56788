"""X2: at a fixed number of steps, one pass over N unique examples beats k epochs over N / k.

Each seed's cached Qwen3-style base (`sims.world.pretrain`) is fine-tuned with the project's ORPO
objective, full-backprop train step and APOLLO optimizer on the new behaviour (preference pairs,
`world.behaviour_example`, every cue) for the same T steps of batch B in every arm. Each seed
draws its own N = T · B distinct episodes; the arms differ only in how many of them they use:

  unique     N examples, each seen once (one epoch)
  epochs_k   the first N / k of them, k epochs (a fresh shuffle per epoch), for k = 8 and 32
  one_batch  the first B of them, every step (k = T epochs; positive control: extreme repetition)

One compiled program trains every arm, seeds vmapped (index tables are traced; `x1_examples_needed
.indexed_finetune`). Metrics, per seed (exact-match accuracy %, `world.accuracies`, fresh
held-out episodes the training pools never contain):

  heldout          = accuracy of the new behaviour, [behaviour, actor, EOS], cues balanced
  forgetting_k     = acc_k(base) − acc_k(final) for k ∈ (qa, arith, fact)   [S, 3]
  mean_forgetting  = mean_k forgetting_k

Dropout (the issue's "± dropout"): `unique_dropout`, `epochs_8_dropout` and `epochs_32_dropout`
repeat those arms with the train step's residual dropout (`make_train_step(dropout=DROPOUT)`, every attention and
MLP output dropped before it joins the residual stream; masks keyed per seed and arm), and

  gap_reduction    = (unique − epochs_k) − (unique_dropout − epochs_k_dropout) held out, per seed
                     (on arm epochs_k_dropout, k = 8, 32; > 0: dropout narrows one pass's advantage)

Criterion (a two-sided 95% interval, paired by seed): IQM(unique.heldout) − IQM(epochs_8.heldout)
≥ 3 pp.
"""

import jax
import jax.numpy as jnp
import numpy as np

from sims import harness
from sims import world as W
from sims.x1_examples_needed import flat, indexed_finetune, stacked_accuracies, tile_AxS

TARGET = 5e-3  # per-step ||Δθ||/||θ|| (≈ lr 1e-4 on a 7B model)
BATCH = 8
POOL_SEED, ORDER_SEED = 802, 8020
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}

DROPOUT = 0.1  # residual dropout of the dropout arms
DROPOUT_SEED = 8021

# arm -> epochs k (None: T, one batch repeated every step)
ARMS = {"unique": 1, "epochs_8": 8, "epochs_32": 32, "one_batch": None}
DROPOUT_ARMS = {"unique_dropout": "unique", "epochs_8_dropout": "epochs_8",  # arm -> the arm it repeats
                "epochs_32_dropout": "epochs_32"}


def n_unique(k, steps: int) -> int:
  """Returns the distinct examples an arm with k epochs uses: N / k, at least one batch' worth."""
  k = steps if k is None else k
  return max(BATCH, steps * BATCH // k)


def index_table(rng, unique: int, steps: int):
  """Returns [steps, BATCH] indices into the first `unique` examples: reshuffled epochs, back to back."""
  total = steps * BATCH
  epochs = -(-total // unique)
  return np.concatenate([rng.permutation(unique) for _ in range(epochs)])[:total].reshape(steps, BATCH)


def seed_pools(world: W.World, seeds: int, n: int):
  """Returns each seed's own n behaviour preference pairs, collated, [S, n, ...]."""
  pools = [W.collate(W.examples("behaviour", n, np.random.default_rng([POOL_SEED, s]), world, preference=True))
           for s in range(seeds)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *pools)


def run(seeds: int, quick: bool, key):
  del key  # each seed's pool and data order come from numpy streams (POOL_SEED, ORDER_SEED, seed)
  smoke = SMOKE or {}
  steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  sets = W.eval_sets(world, n=smoke.get("eval_n", 256))
  arms = list(ARMS)
  a = len(arms)
  uniques = {m: n_unique(ARMS[m], steps) for m in arms}
  pool_S = seed_pools(world, seeds, steps * BATCH)
  idx_AxSxTxB = np.stack([np.stack([index_table(np.random.default_rng([ORDER_SEED, s, i]), uniques[m], steps)
                                    for s in range(seeds)]) for i, m in enumerate(arms)])
  lr = W.lr_for("qwen3", TARGET, base_S, pc=pc, quick=quick, steps=steps)
  params_AxS, _, rel_AxSxT = indexed_finetune(config, tile_AxS(base_S, a, seeds), tile_AxS(pool_S, a, seeds),
                                              idx_AxSxTxB, np.full((a, seeds), steps), np.full((a, seeds), lr["lr"]))
  # The dropout arms: the same pools, index tables and lr as the arms they repeat.
  d_arms = list(DROPOUT_ARMS)
  d = len(d_arms)
  d_idx = np.stack([idx_AxSxTxB[arms.index(DROPOUT_ARMS[m])] for m in d_arms])
  rng_DxS = jnp.stack([jnp.stack([jax.random.PRNGKey(DROPOUT_SEED * 1000 + 100 * i + s) for s in range(seeds)])
                       for i in range(d)])
  d_params, _, _ = indexed_finetune(config, tile_AxS(base_S, d, seeds), tile_AxS(pool_S, d, seeds), d_idx,
                                    np.full((d, seeds), steps), np.full((d, seeds), lr["lr"]), dropout=DROPOUT,
                                    rng_AxS=rng_DxS)
  acc_base, acc, d_acc = stacked_accuracies([base_S, flat(params_AxS), flat(d_params)], sets, config)
  acc = {k: np.concatenate([v.reshape(a, seeds), d_acc[k].reshape(d, seeds)]) for k, v in acc.items()}
  out = {}
  for i, m in enumerate(arms + d_arms):
    forgetting_SxK = np.stack([acc_base[k] - acc[k][i] for k in W.SKILLS], axis=1)
    out[m] = {"heldout": acc["behaviour"][i], "forgetting": forgetting_SxK,
              "mean_forgetting": forgetting_SxK.mean(1)}
  for k in ("epochs_8", "epochs_32"):  # how much of one pass's advantage over k epochs dropout removes
    out[f"{k}_dropout"]["gap_reduction"] = ((out["unique"]["heldout"] - out[k]["heldout"])
                                            - (out["unique_dropout"]["heldout"] - out[f"{k}_dropout"]["heldout"]))
  epochs = {m: steps * BATCH / uniques[m] for m in arms}
  achieved = float(np.nanmean(np.asarray(rel_AxSxT)[:, :, :W.PROBE_STEPS]))
  cfg = {"steps": steps, "batch_size": BATCH, "unique_examples": uniques, "epochs": epochs, "objective": "orpo",
         "optimizer": "dreamjax.optim.apollo(rank=8)", "gradient_mode": "full", "lr_calibration": lr,
         "achieved_rel_update_first_steps": achieved, "dropout": DROPOUT,
         "base_acc": {k: float(np.mean(v)) for k, v in acc_base.items()}, "base": base_info,
         "seeds_vmapped": True, "arms_vmapped": False}
  notes = ["arms (distinct examples × epochs, all " + f"{steps} steps of {BATCH}): "
           + ", ".join(f"{m} {uniques[m]} × {epochs[m]:g}" for m in arms),
           f"lr {lr['lr']:.3g} for ||Δθ||/||θ|| {TARGET:g}/step (calibrated at batch {W.BATCH}); achieved at batch "
           f"{BATCH}, mean over the first {W.PROBE_STEPS} steps: {achieved:.2g}",
           "base accuracy (mean over seeds, %): " + ", ".join(f"{k} {np.mean(v):.1f}" for k, v in acc_base.items())]
  notes.append(f"dropout arms: residual dropout {DROPOUT:g} in the train step, the same pools, index tables and "
               f"lr as the arms they repeat ({', '.join(f'{k} ← {v}' for k, v in DROPOUT_ARMS.items())})")
  return harness.Outcome(data=out, config=cfg, notes=notes)


SIMULATION = harness.Simulation(
    name="x2_epochs",
    question="At a fixed number of steps, does one pass over N unique examples give better held-out behaviour "
             "(and less forgetting) than k epochs over N / k of them?",
    prediction="one pass over diverse data beats many epochs",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed; fine-tuned with "
          "ORPO (full backprop) + APOLLO on behaviour preference pairs, the same steps and batch 8 in every arm "
          "(120 steps, N = 960 in the full run), update size 5e-3/step (≈ lr 1e-4 on a 7B model); each seed "
          "draws its own pool; held-out behaviour = exact match on fresh episodes. Dropout arms: the train "
          "step's residual dropout 0.1.",
    arms={"unique": "N distinct examples, one epoch",
          "epochs_8": "N / 8 distinct examples, 8 epochs (the prediction's 'many epochs')",
          "epochs_32": "N / 32 distinct examples, 32 epochs",
          "one_batch": "one batch of 8 examples repeated every step (positive control: extreme repetition)",
          "unique_dropout": "unique, with residual dropout 0.1 in the train step",
          "epochs_8_dropout": "epochs_8, with residual dropout 0.1 in the train step",
          "epochs_32_dropout": "epochs_32, with residual dropout 0.1 in the train step"},
    criteria=[
        harness.Criterion(arm="unique", baseline="epochs_8", metric="heldout", statistic="iqm_diff", threshold=3.0,
                          direction="greater",
                          description="held-out behaviour: unique − 8 epochs ≥ 3 pp (two-sided 95% interval, "
                                      "seed-paired)"),
    ],
    controls=[
        harness.Control(kind="positive", arm="unique", baseline="one_batch", metric="heldout",
                        statistic="iqm_diff", threshold=3.0, direction="greater",
                        description="extreme repetition (one batch every step) is worse held out by ≥ 3 pp"),
    ],
    effects=[
        harness.Effect(arm="unique", baseline="epochs_32", metric="heldout", statistic="iqm_diff"),
        harness.Effect(arm="epochs_8", baseline="unique", metric="mean_forgetting", statistic="iqm_diff",
                       label="forgetting: 8 epochs − unique (pp)"),
        harness.Effect(arm="epochs_32", baseline="unique", metric="mean_forgetting", statistic="iqm_diff",
                       label="forgetting: 32 epochs − unique (pp)"),
        harness.Effect(arm="unique_dropout", baseline="epochs_8_dropout", metric="heldout", statistic="iqm_diff",
                       label="with dropout: unique − 8 epochs held out (pp)"),
        harness.Effect(arm="epochs_8_dropout", metric="gap_reduction", statistic="iqm",
                       label="dropout closes the gap: (unique − 8 ep.) − (same with dropout) (pp)"),
        harness.Effect(arm="unique_dropout", baseline="epochs_32_dropout", metric="heldout", statistic="iqm_diff",
                       label="with dropout: unique − 32 epochs held out (pp)"),
        harness.Effect(arm="epochs_32_dropout", metric="gap_reduction", statistic="iqm",
                       label="dropout closes the gap: (unique − 32 ep.) − (same with dropout) (pp)"),
        harness.Effect(arm="unique_dropout", baseline="unique", metric="mean_forgetting", statistic="iqm_diff",
                       label="forgetting: dropout − none, one pass (pp)"),
        harness.Effect(arm="epochs_8_dropout", baseline="epochs_8", metric="heldout", statistic="iqm_diff",
                       label="dropout's effect on 8 epochs held out (pp)"),
        harness.Effect(arm="unique", metric="heldout", statistic="iqm"),
        harness.Effect(arm="unique", metric="forgetting", statistic="iqm"),
    ],
    amendment="After the first full runs (2026-11-23), once the model gained dropout: the issue's ± dropout arms "
              "(unique_dropout, epochs_8_dropout, epochs_32_dropout) and the gap_reduction effects were added; they had been left out "
              "because the model had no dropout. The criterion and the control are unchanged.",
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=98,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
