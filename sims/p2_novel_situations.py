"""Prediction 2: a behaviour change learned in some situations carries over to novel ones.

The 8 actors × 8 situations of `sims.world` make 64 (actor, situation) pairs. A fixed split puts
70% of them (45 pairs) in training and holds out the other 19: no training example ever shows a
held-out pair, though every actor and every situation appears in training. Each seed's cached
base model (Qwen3-style, pretrained on the default behaviour for every pair) is fine-tuned with
the project's ORPO objective, full-backprop train step and APOLLO optimizer (`world.finetune`)
on behaviour preference pairs (`world.behaviour_example` semantics) drawn from the training
pairs only, in two matched arms:

  trained:   chosen = target behaviour of the cue, rejected = `world.REJECTED[cue]`
  shuffled:  the same contexts, but the behaviour tokens of chosen and rejected go through a
             random permutation π of (ACCEPT, PUSHBACK, SUGGEST) drawn per example, so the cue no
             longer predicts the chosen behaviour (negative control)

Metrics, per seed, on fresh episodes (new slot values) balanced over the three cues:

  heldout = 100 · mean_i [argmax p(r_0 | context_i) = TARGET[cue_i]]   over held-out pairs
  indist  = the same over the training pairs
  *_exact = exact match of the whole response [behaviour, actor, EOS] (`world.correct_B`)

The behaviour rate reads the first response token (the behaviour) under a fresh forward pass; a
model that picks among the three behaviours without reading the cue scores chance = 100/3 %.
The criterion is the ratio IQM(heldout) / IQM(indist) of the trained arm.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.train.batch import TokenizedExample
from sims import harness
from sims import world as W

TARGET = 5e-3  # per-step ||Δθ||/||θ|| (≈ lr 1e-4 on a 7B model; p1's high arm)
TRAIN_FRACTION = 0.7
POOL = 1024  # training examples per arm
SPLIT_SEED = 0  # the actor×situation split (fixed: the pool is shared by the vmapped seeds)
BEHAVIOURS = (W.ACCEPT, W.PUSHBACK, W.SUGGEST)
CHANCE = 100.0 / len(BEHAVIOURS)
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


def split_pairs(seed: int = SPLIT_SEED, fraction: float = TRAIN_FRACTION):
  """Returns (train, heldout) lists of (actor, situation) index pairs.

  round(fraction · 64) pairs train; redrawn until every actor and every situation appears on both
  sides (a held-out pair is then a new combination of familiar parts).
  """
  rng = np.random.default_rng(seed)
  pairs = [(a, s) for a in range(W.N_ACTORS) for s in range(W.N_SITUATIONS)]
  n_train = int(round(fraction * len(pairs)))
  while True:
    order = rng.permutation(len(pairs))
    train = sorted(pairs[i] for i in order[:n_train])
    held = sorted(pairs[i] for i in order[n_train:])
    covered = lambda ps, k, n: len({p[k] for p in ps}) == n
    if all(covered(ps, k, n) for ps in (train, held) for k, n in ((0, W.N_ACTORS), (1, W.N_SITUATIONS))):
      return train, held


def pair_example(rng, world: W.World, pair, cue: int, preference: bool = True) -> TokenizedExample:
  """Returns `world.behaviour_example` for one (actor, situation) pair and cue."""
  return W.behaviour_example(rng, world, cue=cue, preference=preference, actors=[pair[0]],
                             situations=[pair[1]])


def pair_examples(rng, world: W.World, pairs, n: int, balanced_cues: bool = False, **kw):
  """Returns n examples over `pairs` (drawn uniformly); cues uniform, or cycling when balanced."""
  idx = rng.integers(len(pairs), size=n)
  cues = [W.CUES[i % 3] for i in range(n)] if balanced_cues else [int(c) for c in rng.choice(W.CUES, n)]
  return [pair_example(rng, world, pairs[i], c, **kw) for i, c in zip(idx, cues)]


def shuffle_labels(exs, rng):
  """Returns the examples with chosen/rejected behaviour tokens mapped by a per-example permutation."""
  out = []
  for ex in exs:
    perm = dict(zip(BEHAVIOURS, (BEHAVIOURS[i] for i in rng.permutation(len(BEHAVIOURS)))))
    out.append(TokenizedExample(context=ex.context, chosen=[perm[ex.chosen[0]], *ex.chosen[1:]],
                                rejected=[perm[ex.rejected[0]], *ex.rejected[1:]]))
  return out


@functools.partial(jax.jit, static_argnames=("config",))
def rates_S(params_S, batch, *, config):
  """Returns ([S], [S]): % whose argmax first response token is the target; % exact match."""
  def one(params):
    pred_BxR = jnp.argmax(W.response_logits(params, batch, config), axis=-1)
    return (jnp.mean(pred_BxR[:, 0] == batch.chosen_BxR[:, 0]) * 100.0,
            jnp.mean(W.exact_match_B(pred_BxR, batch)) * 100.0)
  return jax.vmap(one)(params_S)


def rates(params_S, sets, config):
  """Returns {metric: [S]}: behaviour rate and exact match on the held-out and training pairs."""
  out = {}
  for name, b in sets.items():
    behaviour_S, exact_S = rates_S(params_S, b, config=config)
    out[name], out[f"{name}_exact"] = np.asarray(behaviour_S), np.asarray(exact_S)
  return out


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps")  # None: world.finetune's shared step count
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  n_eval = smoke.get("eval_n", 256)
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  train_pairs, held_pairs = split_pairs()
  rng = np.random.default_rng(21)
  real = pair_examples(rng, world, train_pairs, POOL)
  pools = {"trained": W.collate(real), "shuffled": W.collate(shuffle_labels(real, rng))}
  eval_rng = np.random.default_rng(12345)
  sets = {"heldout": W.collate(pair_examples(eval_rng, world, held_pairs, n_eval, True, preference=False)),
          "indist": W.collate(pair_examples(eval_rng, world, train_pairs, n_eval, True, preference=False))}
  lr = W.lr_for("qwen3", TARGET, base_S, pc=pc, quick=quick, steps=steps)
  keys_S = harness.seed_keys(key, seeds)
  base = rates(base_S, sets, config)
  out = {}
  for arm, pool in pools.items():
    params_S, _ = W.finetune("qwen3", base_S, keys_S, pool, lr=lr["lr"], quick=quick, steps=steps)
    out[arm] = rates(params_S, sets, config)
  steps_used = steps or (W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  cfg = {"steps": steps_used, "batch_size": W.BATCH, "pool": POOL, "objective": "orpo",
         "optimizer": "dreamjax.optim.apollo(rank=8)", "lr_calibration": lr, "train_pairs": train_pairs,
         "heldout_pairs": held_pairs, "eval_n": n_eval, "base": base_info, "seeds_vmapped": True,
         "base_rates": {k: float(np.mean(v)) for k, v in base.items()}}
  notes = [f"split: {len(train_pairs)} training pairs, {len(held_pairs)} held-out pairs of "
           f"{W.N_ACTORS}×{W.N_SITUATIONS} (fixed across seeds, seed {SPLIT_SEED})",
           "base behaviour rate (mean over seeds, %): " + ", ".join(
               f"{k} {np.mean(v):.1f}" for k, v in base.items()),
           f"lr {lr['lr']:.3g} for ||Δθ||/||θ|| {TARGET:g}/step; chance = {CHANCE:.1f}%"]
  return harness.Outcome(data=out, config=cfg, notes=notes)


SIMULATION = harness.Simulation(
    name="p2_novel_situations",
    question="Does a behaviour change trained on 70% of actor×situation pairs show up as strongly on "
             "the 30% of pairs never trained on?",
    prediction="behaviour change generalises",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed on the "
          "general skills and the default behaviour; ORPO (full backprop) + APOLLO via world.finetune "
          "on 1024 behaviour preference pairs over 45 of the 64 actor×situation pairs (fixed split, every "
          "actor and situation on both sides); per-step ||Δθ||/||θ|| = 5e-3; behaviour rate = argmax "
          "first response token equals the cue's target, on fresh episodes balanced over cues.",
    arms={"trained": "preference pairs on the training pairs (target chosen, world.REJECTED rejected)",
          "shuffled": "the same contexts, behaviour tokens of chosen/rejected permuted at random per "
                      "example (negative control: the cue no longer predicts the label)"},
    criteria=[
        harness.Criterion(arm="trained", metric="heldout", statistic="iqm_ratio", baseline_metric="indist",
                          threshold=0.8, direction="greater",
                          description="held-out ÷ in-distribution behaviour rate ≥ 0.8"),
    ],
    controls=[
        harness.Control(kind="positive", arm="trained", metric="indist", statistic="iqm", threshold=80.0,
                        direction="greater",
                        description="the behaviour is learned on the training pairs: rate ≥ 80% "
                                    "(else the ratio compares chance with chance)"),
        harness.Control(kind="negative", arm="shuffled", metric="heldout", statistic="iqm",
                        threshold=CHANCE + 10.0, direction="less",
                        description="shuffled labels: held-out behaviour rate ≤ chance (100/3 %) + 10 pp"),
    ],
    effects=[
        harness.Effect(arm="trained", metric="heldout", statistic="iqm_diff", baseline_metric="indist",
                       label="trained: heldout − indist (pp)"),
        harness.Effect(arm="trained", metric="heldout_exact", statistic="iqm_ratio",
                       baseline_metric="indist_exact", label="trained: exact-match ratio heldout ÷ indist"),
        harness.Effect(arm="trained", metric="heldout", statistic="iqm_diff", baseline="shuffled"),
        harness.Effect(arm="shuffled", metric="indist", statistic="iqm"),
    ],
    amendment="Disclosed change before the first full run: at update size 2e-3/step the positive control (the "
              "trained arm learns its own pairs) failed in a quick development run; the manipulation was "
              "raised to 5e-3/step (p1's high arm). No threshold changed.",
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=60,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
