"""Prediction 5: the stack stays plastic over many small behaviour updates.

Each seed's cached base model (Qwen3-style) goes through R rounds (full 100, quick 25) of small
behaviour updates. Round r brings a new rule: cue c_r (clear / wrong / vague) now answers
[t_r, actor, EOS], t_r one of the behaviour tokens (ACCEPT, PUSHBACK, SUGGEST) other than the
cue's current answer; its preference pairs take the new answer as chosen and the previous one as
rejected. Before the scored rounds, WARMUP unscored rounds (at 3× the arm's lr) teach the target
behaviour on all cues (W.TARGET, the rules' starting point), so that every response token is in
use when round 1 starts: the base only ever says SUGGEST, and without the warm-up the first
rounds would measure learning to emit ACCEPT/PUSHBACK at all, not plasticity. Every round trains
T fixed steps on its pool with the project's train step (ORPO), one TrainState carried across all
rounds, in matched arms:

  baseline  plain AdamW (optax.adamw, no weight decay), gradient_mode='full', narrow data (one
            actor, one situation, two slot values), no replay, the larger update size.
  stack     the project's stack: APOLLO (rank 8), gradient_mode='frozen', diverse data with 25%
            replay of the general skills (SFT), the small update size.
  stack_annealed  the stack with its lr decayed geometrically to ANNEAL × over the rounds
            (positive control: shrinking updates must show up as lost plasticity).

Every seed draws its own rules and pools (generated up front as arrays [R, P]); each round is one
call of the suite's shared fine-tuning program (`sims.engine`: optimizer, lr and pool traced; one
compile per gradient mode), seeds vmapped, continuing the previous round's train state.

Metrics, per seed:
  acc_r        = exact-match accuracy (%) of round r's rule after its T steps, on fresh episodes
                 of the arm's own training distribution (diverse for the stack, narrow for the
                 baseline): plasticity as the ability to fit a new rule in fixed steps; [S, R]
  plasticity   = mean(acc over the last ⌈R/10⌉ rounds) / mean(acc over the first ⌈R/10⌉)
  first_acc    = mean(acc over the first ⌈R/10⌉ rounds)
  eff_rank     = exp(−Σ p_i log p_i), p_i = σ_i / Σ σ_j, the singular values of the centred final
                 residual stream at the last context token on a fixed probe batch (Roy & Vetterli
                 2007), after the last round; eff_rank_ratio = eff_rank(final) / eff_rank(base)
  dead_units   = fraction of MLP hidden units (SwiGLU gate, both layers) whose gate input x·W_gate
                 is ≤ 0 on every real token of the probe batch (SiLU's negative side is ≈ 0: the
                 unit never opens), after the last round; dead_units_change = final − base
  weight_norm  = ||θ_final|| / ||θ_base||
The probe batch's MLP inputs come from the project's own `dreamjax.model.decoder.forward`
(`return_mlp_inputs=True`); the gate input is that times the layer's W_gate.
Criterion: IQM_s(last_acc) / IQM_s(first_acc) ≥ 0.9 for the stack, on its 95% bootstrap interval
(the ratio of the seeds' IQMs: a per-seed ratio is undefined when a seed's first window scores 0,
which narrow-data arms can do; the per-seed ratio's IQM is reported as an effect).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamjax.model import decoder, layout, positions_from_mask
from dreamjax.train.batch import PreferenceBatch, TokenizedExample
from sims import engine
from sims import harness
from sims import world as W

ROUNDS, QUICK_ROUNDS, SMOKE_ROUNDS = 100, 25, 3
WARMUP, SMOKE_WARMUP = 6, 1  # unscored rounds that first teach the target behaviour (all three cues)
WARMUP_LR = 3.0  # the warm-up rounds' lr, relative to the arm's own
STEPS = 8  # train steps per round (fixed: the "small" update)
BATCH = 8
POOL = 64  # examples per round's pool
EVAL_N = 32  # held-out episodes of each round's rule
BANK = 256  # collated episodes per seed and setup that the rounds' pools and evaluations index
PROBE_N = 64  # probe batch for effective rank and dead units
REPLAY = 0.25
TARGETS = {"stack": 5e-3, "baseline": 2e-2}  # per-step ||Δθ||/||θ|| (world.lr_for; adamw: see lr_adamw)
ANNEAL = 0.1  # stack_annealed's lr at the last round, relative to its first
NARROW = dict(actors=[0], situations=[0], values=[0, 1])
RESPONSES = (W.ACCEPT, W.PUSHBACK, W.SUGGEST)
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}

ARMS = ("baseline", "stack", "stack_annealed")
SETUPS = {"baseline": ("adamw", "full"), "stack": ("apollo", "frozen")}


# ---------------------------------------------------------------------------------------------
# Data: per seed, R rules and their pools, as arrays.


def rule_example(rng, cue: int, answer: int, previous: int, header_kw: dict, preference: bool = True):
  """Returns [header, cue] → [answer, actor, EOS] (≻ [previous, actor, EOS] when preference)."""
  toks, _ = W.header(rng, **header_kw)
  actor = toks[1]
  rej = [previous, actor, W.EOS] if preference else None
  return TokenizedExample(context=toks + [cue], chosen=[answer, actor, W.EOS], rejected=rej)


def replay_examples(rng, world: W.World, n: int) -> list:
  """Returns n general-skill SFT examples (QA, arithmetic, facts)."""
  return [W.GENERATORS[W.SKILLS[int(k)]](rng, world) for k in rng.integers(0, len(W.SKILLS), n)]


def rules(rng, rounds: int):
  """Returns [(cue, new answer, previous answer)] per round; every cue starts at its TARGET answer."""
  current = dict(W.TARGET)
  out = []
  for _ in range(rounds):
    cue = int(rng.choice(W.CUES))
    answer = int(rng.choice([t for t in RESPONSES if t != current[cue]]))
    out.append((cue, answer, current[cue]))
    current[cue] = answer
  return out


def stack_tree(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def bank(examples: list) -> dict:
  """Returns the examples collated, as a dict of numpy arrays (PreferenceBatch fields)."""
  return {k: np.asarray(v) for k, v in vars(W.collate(examples)).items()}


def rule_rows(template: dict, idx, cue, answer, previous) -> dict:
  """Returns template rows idx with cue (last context token), answer and previous (response slot 0) set.

  template holds collated `rule_example`s: left-padded contexts ending in the cue, responses
  [answer, actor, EOS] and [previous, actor, EOS]; cue/answer/previous broadcast against idx.
  """
  rows = {k: v[idx].copy() for k, v in template.items()}
  rows["context_BxC"][..., -1] = cue
  rows["chosen_BxR"][..., 0] = answer
  rows["rejected_BxR"][..., 0] = previous
  return rows


def seed_data(world: W.World, seed: int, rounds: int, eval_n: int, warmup: int):
  """Returns {'baseline' | 'stack': (pools [W + R, P], evals [W + R, eval_n])} of one seed.

  The first `warmup` rounds teach the target behaviour (every cue: chosen TARGET, rejected
  REJECTED, as `world.behaviour_example`), the next R rounds one new rule each. Episodes come
  from banks of collated examples (headers drawn by `world.header`) whose cue and answer tokens
  are set per round.
  """
  rng = np.random.default_rng([505, seed])
  plan = rules(rng, rounds)
  total = warmup + rounds
  n_replay = int(round(REPLAY * POOL))
  cue_T = np.array([W.CUES[0]] * warmup + [c for c, _, _ in plan])
  out = {}
  for setup in SETUPS:
    kw = NARROW if setup == "baseline" else {}
    n_new = POOL if setup == "baseline" else POOL - n_replay
    make = lambda n, pref: bank([rule_example(rng, W.CUE_CLEAR, W.ACCEPT, W.SUGGEST, kw, pref) for _ in range(n)])
    train_bank, eval_bank = make(BANK, True), make(BANK, False)
    parts = []
    for template, n, per_example in ((train_bank, n_new, False), (eval_bank, eval_n, True)):
      idx_TxN = rng.integers(0, BANK, (total, n))
      cue_TxN = np.repeat(cue_T[:, None], n, axis=1)
      # warm-up rounds: a random cue per training example, the cues in turn for evaluation
      cue_TxN[:warmup] = (np.resize(W.CUES, (warmup, n)) if per_example
                          else rng.choice(W.CUES, (warmup, n)))
      answer_TxN = np.vectorize(W.TARGET.get)(cue_TxN)
      previous_TxN = np.vectorize(W.REJECTED.get)(cue_TxN)
      for r, (c, ans, prev) in enumerate(plan):
        answer_TxN[warmup + r], previous_TxN[warmup + r] = ans, prev
      parts.append(rule_rows(template, idx_TxN, cue_TxN, answer_TxN, previous_TxN))
    pools, evals = parts
    if setup != "baseline":
      replay = bank(replay_examples(rng, world, BANK))
      extra = {k: v[rng.integers(0, BANK, (total, n_replay))] for k, v in replay.items()}
      pools = {k: np.concatenate([pools[k], extra[k]], axis=1) for k in pools}
    as_batch = lambda d: PreferenceBatch(**{k: jnp.asarray(v) for k, v in d.items()})
    out[setup] = (as_batch(pools), as_batch(evals))
  return out, plan


def probe_batch(world: W.World, n: int):
  """Returns a fixed mixed probe batch: QA, arithmetic, facts and behaviour episodes."""
  rng = np.random.default_rng(4242)
  kinds = ("qa", "arith", "fact", "behaviour")
  return W.collate([W.GENERATORS[kinds[i % 4]](rng, world) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Health metrics of a network (traceable; one seed).


def effective_rank(x_BxD):
  """Returns exp(entropy of the normalised singular values) of the centred features."""
  s = jnp.linalg.svd(x_BxD - x_BxD.mean(0), compute_uv=False)
  p = s / jnp.maximum(s.sum(), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0)))


def health(params, probe, config):
  """Returns (effective rank, dead-unit fraction, weight norm) of one network on the probe batch."""
  out = decoder.forward(params, probe.context_BxC, positions_from_mask(probe.context_mask_BxC),
                        probe.context_mask_BxC, config=config, head=False, return_hidden=True, return_mlp_inputs=True)
  hidden, mlp_in = out.hidden, out.mlp_inputs
  gates = [x @ layer["mlp"]["gate_proj"] for x, layer in zip(mlp_in, layout.unstack(params, config))]
  real_BxT = probe.context_mask_BxC.astype(bool)[..., None]
  open_F = jnp.concatenate([jnp.any((g > 0) & real_BxT, axis=(0, 1)) for g in gates])
  return effective_rank(hidden[-1][:, -1]), jnp.mean(~open_F), optax.tree.norm(params)


# ---------------------------------------------------------------------------------------------
# The rounds.


@functools.lru_cache(maxsize=None)
def _round_metrics_fn(config):
  """Returns jit: (params [S], evals [S, N], update norms [S, T]) → (accuracy % [S], mean ||Δθ|| / ||θ|| [S])."""
  def one(params, ev, upd_T):
    return W.correct_B(params, ev, config=config).mean() * 100.0, upd_T.mean() / optax.tree.norm(params)
  return jax.jit(jax.vmap(one))


def train_rounds(config, optimizer: str, gradient_mode: str, base_S, keys_S, pools_SxR, evals_SxR, lr_R, steps: int):
  """Returns (params [S, ...], {'acc', 'rel_update'}: [S, R]): the rounds, one train state carried across.

  Round r's step i trains (ORPO) on a batch of BATCH drawn uniformly from round r's pool with
  fold_in(key, r · steps + i) at lr_R[r]: one call of the suite's shared fine-tuning program
  (`sims.engine`; optimizer and lr traced) per round, then round r's rule is evaluated.
  """
  metrics = _round_metrics_fn(config)
  n = pools_SxR.context_BxC.shape[2]
  state, acc, rel = engine.init(base_S), [], []
  for r, lr in enumerate(np.asarray(lr_R, np.float32)):
    idx = engine.sample_indices(keys_S, n, BATCH, start=r * steps)
    res = engine.run(config, state, engine.take(pools_SxR, (slice(None), r)), idx,
                     engine.arm(steps, float(lr), optimizer=optimizer), gradient_mode=gradient_mode)
    state = res.state
    a, u = metrics(res.params, engine.take(evals_SxR, (slice(None), r)), res.update_norm[:, :steps])
    acc.append(a)
    rel.append(u)
  return res.params, {"acc": np.stack(acc, axis=1), "rel_update": np.stack(rel, axis=1)}


@functools.lru_cache(maxsize=None)
def _health_fn(config):
  return jax.jit(jax.vmap(lambda p, probe: health(p, probe, config), in_axes=(0, None)))


def lr_adamw(base_S, target: float) -> float:
  """Returns AdamW's lr for a per-step ||Δθ||/||θ|| target: Adam moves each weight by ≈ lr, so
  ||Δθ|| ≈ lr·√n and lr ≈ target·||θ||/√n = target · rms(θ) (seed 0's base). The achieved
  update size is measured during the run and reported."""
  leaves = jax.tree.leaves(jax.tree.map(lambda x: x[0], base_S))
  n = sum(x.size for x in leaves)
  return float(target * optax.tree.norm(leaves) / math.sqrt(n))


def summarise(curves: dict, final_health, base_health, warmup: int, window: int) -> dict:
  """Returns the per-seed metrics [S] (and the accuracy curve [S, R] of the scored rounds)."""
  acc_SxR = np.asarray(curves["acc"])[:, warmup:]
  first, last = acc_SxR[:, :window].mean(1), acc_SxR[:, -window:].mean(1)
  erank0, dead0, norm0 = (np.asarray(x) for x in base_health)
  erank, dead, norm = (np.asarray(x) for x in final_health)
  plasticity = np.where(first > 0, last / np.maximum(first, 1e-12), np.nan)
  return {"plasticity": plasticity, "first_acc": first, "last_acc": last, "acc_curve": acc_SxR,
          "warmup_acc": np.asarray(curves["acc"])[:, warmup - 1],
          "eff_rank": erank, "eff_rank_ratio": erank / erank0, "dead_units": dead,
          "dead_units_change": dead - dead0, "weight_norm": norm / norm0,
          "rel_update": np.asarray(curves["rel_update"]).mean(1),
          "rel_update_first": np.asarray(curves["rel_update"])[:, warmup:warmup + window].mean(1),
          "rel_update_last": np.asarray(curves["rel_update"])[:, -window:].mean(1)}


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  rounds = SMOKE_ROUNDS if smoke else (QUICK_ROUNDS if quick else ROUNDS)
  steps = smoke.get("steps", STEPS)
  eval_n = min(smoke.get("eval_n", EVAL_N), EVAL_N)
  warmup = SMOKE_WARMUP if smoke else WARMUP
  window = max(1, math.ceil(rounds / 10))
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  per_seed = [seed_data(world, s, rounds, eval_n, warmup) for s in range(seeds)]
  probe = probe_batch(world, min(smoke.get("eval_n", PROBE_N), PROBE_N))
  health_fn = _health_fn(config)
  base_health = health_fn(base_S, probe)
  lr_stack = W.lr_for("qwen3", TARGETS["stack"], base_S)
  lrs = {"stack": lr_stack["lr"], "baseline": lr_adamw(base_S, TARGETS["baseline"])}
  warm_R = np.full(warmup, WARMUP_LR)
  anneal_R = ANNEAL ** (np.arange(rounds) / max(rounds - 1, 1))
  lr_R = {"baseline": lrs["baseline"] * np.concatenate([warm_R, np.ones(rounds)]),
          "stack": lrs["stack"] * np.concatenate([warm_R, np.ones(rounds)]),
          "stack_annealed": lrs["stack"] * np.concatenate([warm_R, anneal_R])}
  keys_S = harness.seed_keys(key, seeds)
  out = {}
  for arm in ARMS:
    setup = "baseline" if arm == "baseline" else "stack"
    pools = stack_tree([d[0][setup][0] for d in per_seed])
    evals = stack_tree([d[0][setup][1] for d in per_seed])
    params, curves = train_rounds(config, *SETUPS[setup], base_S, keys_S, pools, evals, lr_R[arm], steps)
    out[arm] = summarise(curves, health_fn(params, probe), base_health, warmup, window)
  cfg = {"rounds": rounds, "warmup_rounds": warmup, "warmup_lr_factor": WARMUP_LR, "steps_per_round": steps, "batch_size": BATCH, "pool_per_round": POOL,
         "eval_per_round": eval_n, "window_rounds": window, "replay_fraction": REPLAY, "objective": "orpo",
         "responses": list(RESPONSES), "targets_rel_update": TARGETS, "lr": lrs, "anneal_final_factor": ANNEAL,
         "setups": {"baseline": "optax.adamw(wd=0), gradient_mode=full, narrow data, no replay",
                    "stack": "dreamjax.optim.apollo(rank=8), gradient_mode=frozen, diverse data + 25% replay"},
         "lr_calibration_stack": lr_stack,
         "measured_rel_update": {arm: float(np.mean(out[arm]["rel_update"])) for arm in ARMS},
         "probe_n": int(probe.batch_size), "base": base_info, "model": str(config), "seeds_vmapped": True}
  notes = [f"lr: stack {lrs['stack']:.3g} (APOLLO, target ||Δθ||/||θ|| {TARGETS['stack']:g}/step by "
           f"world.lr_for), baseline {lrs['baseline']:.3g} (AdamW, target {TARGETS['baseline']:g}/step by "
           "lr ≈ target·rms(θ)); measured mean per-step update size: " + ", ".join(
               f"{a} {cfg['measured_rel_update'][a]:.2g}" for a in ARMS),
           "base model: effective rank {:.2f}, dead units {:.3f} (mean over seeds)".format(
               float(np.mean(np.asarray(base_health[0]))), float(np.mean(np.asarray(base_health[1]))))]
  for arm in ARMS:
    o = out[arm]
    notes.append(f"{arm}: target-behaviour accuracy after the warm-up {np.mean(o['warmup_acc']):.1f}%; "
                 f"mean new-rule accuracy first {window} rounds {np.mean(o['first_acc']):.1f}%, last "
                 f"{window} rounds {np.mean(o['last_acc']):.1f}%; final effective rank {np.mean(o['eff_rank']):.2f}, "
                 f"dead units {np.mean(o['dead_units']):.3f}, weight norm ×{np.mean(o['weight_norm']):.3f}; "
                 f"per-step ||Δθ||/||θ|| first {window} rounds {np.mean(o['rel_update_first']):.2g}, last {window} "
                 f"rounds {np.mean(o['rel_update_last']):.2g}")
  return harness.Outcome(data=out, config=cfg, notes=notes)


def plot(fig, data, analysis):
  """Draws the new-rule accuracy per round (mean over seeds, and a 10-round running mean)."""
  del analysis
  ax = fig.subplots(1, 1)
  for arm in ARMS:
    if arm not in data:
      continue
    acc = np.asarray(data[arm]["acc_curve"]).mean(0)
    rounds = np.arange(1, acc.shape[0] + 1)
    line, = ax.plot(rounds, acc, alpha=0.3)
    k = min(10, len(acc))
    ax.plot(rounds[k - 1:], np.convolve(acc, np.ones(k) / k, mode="valid"), color=line.get_color(), label=arm)
  ax.set(xlabel="round", ylabel="new-rule accuracy after the fixed steps (%)", title="plasticity over rounds")
  ax.legend()


SIMULATION = harness.Simulation(
    name="p5_plasticity_rounds",
    question="Over many rounds of small behaviour updates, does the project's stack (APOLLO, frozen "
             "context, 25% replay, small lr) keep learning new rules as fast as in the first rounds?",
    prediction="the stack stays plastic over many small updates: stack keeps ≥ 90% of round-1 "
               "plasticity at round 100",
    setup="sims.world, Qwen3-style tiny decoder pretrained per seed; 100 rounds (quick: 25) of a new "
          "cue → response rule each, trained for a fixed 8 steps (batch 8) with ORPO; one TrainState "
          "across rounds; per-seed rules and pools; plasticity = new-rule accuracy after the fixed "
          "steps, last 10% of rounds ÷ first 10%.",
    arms={"baseline": "AdamW, full backprop, narrow data, no replay, update size 2e-2/step",
          "stack": "APOLLO, frozen context, diverse data + 25% replay, update size 5e-3/step (the prediction)",
          "stack_annealed": "the stack with its lr decayed geometrically to 0.1× by the last round "
                            "(positive control: the ratio registers a loss of plasticity)"},
    criteria=[
        harness.Criterion(arm="stack", metric="last_acc", statistic="iqm_ratio", baseline_metric="first_acc",
                          threshold=0.9, direction="greater",
                          label="stack plasticity: IQM(last 10% acc) / IQM(first 10% acc)",
                          description="stack: new-rule accuracy after the fixed steps in the last 10% of rounds "
                                      "≥ 0.9 × the first 10% (ratio of the seeds' IQMs)"),
    ],
    controls=[
        harness.Control(kind="positive", arm="stack_annealed", metric="last_acc", statistic="iqm_ratio",
                        baseline_metric="first_acc", threshold=0.9, direction="less",
                        label="stack_annealed plasticity: IQM(last 10% acc) / IQM(first 10% acc)",
                        description="annealing the stack's lr to 0.1× over the rounds drops the ratio below 0.9"),
        harness.Control(kind="positive", arm="stack", metric="first_acc", statistic="iqm", threshold=50.0,
                        direction="greater",
                        description="the stack learns a new rule in the fixed steps at first (≥ 50%): "
                                    "the ratio has room to fall"),
    ],
    effects=[
        harness.Effect(arm="baseline", metric="last_acc", statistic="iqm_ratio", baseline_metric="first_acc",
                       label="baseline plasticity: IQM(last 10% acc) / IQM(first 10% acc)"),
        harness.Effect(arm="stack", metric="plasticity", statistic="iqm", label="stack: per-seed ratio, IQM"),
        harness.Effect(arm="baseline", metric="plasticity", statistic="iqm", label="baseline: per-seed ratio, IQM"),
        harness.Effect(arm="stack", metric="first_acc", statistic="iqm"),
        harness.Effect(arm="baseline", metric="first_acc", statistic="iqm"),
        harness.Effect(arm="stack", metric="eff_rank_ratio", statistic="iqm"),
        harness.Effect(arm="baseline", metric="eff_rank_ratio", statistic="iqm"),
        harness.Effect(arm="stack", metric="dead_units_change", statistic="iqm"),
        harness.Effect(arm="baseline", metric="dead_units_change", statistic="iqm"),
        harness.Effect(arm="stack", metric="weight_norm", statistic="iqm"),
        harness.Effect(arm="baseline", metric="weight_norm", statistic="iqm"),
    ],
    run=run,
    plot=plot,
    seeds=8,
    quick_seeds=3,
    cost=111,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
