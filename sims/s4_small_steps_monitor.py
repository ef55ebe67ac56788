"""S4: small steps keep drift monitorable; the project's guard stops a bad run early.

Each seed's cached base model (Qwen3-style) is fine-tuned with the project's ORPO objective,
full-backprop train step and APOLLO on diverse behaviour preference pairs (no replay) for
CHUNKS "epochs" of equal length, at a sweep of per-step update sizes ||Δθ||/||θ|| (`world.lr_for`):
two healthy ones, an intermediate one and a destructive one. A random-init model (not pretrained)
trained at the larger healthy size is the false-alarm control. Training never stops: after every
chunk the project's `dreamjax.train.monitor.Monitor` computes its figures (held-out general
perplexity ratio, weight drift, residual growth vs the base, held-out chosen/rejected log-probs)
against the arm's own starting model, and a `Guard` with the project's default `GuardConfig`
decides continue/abort on them (`Guard.decide`, the trend tracker included), as `dreamjax.train.loop`
does at each eval. The first chunk whose decision is 'abort' is where the guard would have fired.

Capability is the mean exact-match accuracy over the general skills (qa, arith, fact), in %:
  cap_c          = mean_k acc_k after chunk c (cap_0: the starting model)
  cap_loss       = cap_0 − cap_C, the eventual capability loss of the whole run (pp)
  half_chunk     = min { c ≥ 1 : cap_0 − cap_c ≥ ½ · cap_loss }  (C + 1 if cap_loss ≤ 0)
  fire_chunk     = the first chunk the guard aborts at (C + 1 if it never does)
  fired          = 1 if the guard aborts at any chunk, else 0
  early          = 1 if fire_chunk < half_chunk (the guard fires before half the loss), else 0
  loss_frac_at_fire = (cap_0 − cap_fire) / cap_loss  (1 when it never fires)
  ratio_before_half = perplexity/ratio at eval half_chunk − 1 (1 at the start): a perplexity
                    limit below it would have fired before half the loss
Seeds are vmapped: each chunk is one call of the suite's shared fine-tuning program (`sims.engine`)
for all seeds of an arm, and the params after every chunk are kept; the monitor and the guard then
run per seed on the host, as in a real run.
"""

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.model import init_params
from dreamjax.train import evaluation
from dreamjax.train import guard as guard_lib
from sims import engine
from sims import harness
from sims import world as W

CHUNKS = 10
# Per-step ||Δθ||/||θ|| targets (world.lr_for: APOLLO, ORPO); ×0.02 ≈ the lr on a 7B model.
# arm -> (starting model, per-step ||Δθ||/||θ|| target, linear warmup as a fraction of the run)
ARMS = {"healthy_5e-4": ("base", 5e-4, 0.0), "healthy_2e-3": ("base", 2e-3, 0.0),
        "mid_1e-2": ("base", 1e-2, 0.0), "destructive_5e-2": ("base", 5e-2, 0.0),
        "destructive_warmup": ("base", 5e-2, 0.3), "random_init": ("random", 2e-3, 0.0)}
HEALTHY = ("healthy_5e-4", "healthy_2e-3")
DESTRUCTIVE = ("destructive_5e-2", "destructive_warmup")
EVAL_GENERAL, EVAL_PREF = 64, 64  # held-out examples for the monitor (run loop: eval_examples)
EVAL_CAPABILITY = 128  # world.eval_sets examples per skill, evaluated after every chunk
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


def train_chunks(config, start_S, keys_S, pool, lr: float, warmup: float, chunks: int, chunk_steps: int):
  """Returns (params after every chunk [C, S, ...], loss [S, C, T]): APOLLO fine-tuning in chunks.

  Step i trains on `world.sample_batch` rows drawn with fold_in(key, i) at lr · min(1, (i + 1) / warmup)
  (warmup in steps; 1 = constant lr): one call of the suite's shared fine-tuning program
  (`sims.engine`, lr and warm-up traced) per chunk, each continuing the previous chunk's state.
  """
  idx = engine.sample_indices(keys_S, pool.context_BxC.shape[0], W.BATCH)
  state, params, losses = engine.init(start_S), [], []
  for c in range(chunks):
    res = engine.run(config, state, pool, idx[:, c * chunk_steps:], engine.arm(chunk_steps, lr, warmup=warmup))
    state = res.state
    params.append(res.params)
    losses.append(res.loss[:, :chunk_steps])
  return engine.stack(params), np.stack(losses, axis=1)


def held_out(world: W.World, smoke: dict):
  """Returns (general batch, preference batch): held-out examples for the monitor, never trained on."""
  rng = np.random.default_rng(31)
  n_gen, n_pref = smoke.get("eval_n", EVAL_GENERAL), smoke.get("eval_n", EVAL_PREF)
  general = [W.GENERATORS[W.SKILLS[i % 3]](rng, world) for i in range(n_gen)]
  pref = W.examples("behaviour", n_pref, rng, world, preference=True)
  return W.collate(general), W.collate(pref)


def guard_run(base, params_C, config, general, pref, chunk_steps):
  """Returns (abort flags [C], reasons of the first abort, perplexity ratio [C]): the project's
  Monitor + Guard at the end of every chunk."""
  monitor = evaluation.Evaluator(base, config, [general], [pref])
  guard = guard_lib.Guard("unused", guard_lib.GuardConfig(), is_main_process=False)  # decisions only, no log file
  aborts, first, ratio = [], (), []
  for c, params in enumerate(params_C):
    figures = monitor.figures(params)
    d = guard.decide((c + 1) * chunk_steps, figures)
    aborts.append(d.action == "abort")
    ratio.append(figures["perplexity/ratio"])
    if aborts[-1] and not first:
      first = d.reasons
  return np.asarray(aborts), first, np.asarray(ratio)


@functools.lru_cache(maxsize=None)
def _capability_fn(config):
  """Returns jit(f): params [C, S, ...] → mean general-skill accuracy (%) [C, S], one call per arm."""

  def one(params, sets):
    return jnp.mean(jnp.stack([W.correct_B(params, sets[k], config=config).mean() for k in W.SKILLS])) * 100.0

  per_chunk = jax.vmap(one, in_axes=(0, None))  # seeds
  return jax.jit(lambda params_CxS, sets: jax.lax.map(lambda p: per_chunk(p, sets), params_CxS))


def capability_C(params_CxS, sets, config):
  """Returns the mean general-skill accuracy (%) after every chunk, [S, C] (`world.correct_B`)."""
  return np.asarray(_capability_fn(config)(params_CxS, sets)).T


def timing_metrics(cap0_S, cap_SxC, abort_SxC):
  """Returns the per-seed metrics of the module docstring from capabilities and guard decisions."""
  chunks = cap_SxC.shape[1]
  loss_SxC = cap0_S[:, None] - cap_SxC
  cap_loss = loss_SxC[:, -1]
  reached = (loss_SxC >= 0.5 * cap_loss[:, None]) & (cap_loss[:, None] > 0)
  half = np.where(reached.any(1), reached.argmax(1) + 1, chunks + 1)
  fired = abort_SxC.any(1)
  fire = np.where(fired, abort_SxC.argmax(1) + 1, chunks + 1)
  at_fire = np.take_along_axis(loss_SxC, np.minimum(fire, chunks)[:, None] - 1, 1)[:, 0]
  with np.errstate(divide="ignore", invalid="ignore"):
    frac = np.where(fired & (cap_loss > 0), at_fire / np.where(cap_loss > 0, cap_loss, 1.0), 1.0)
  f64 = lambda x: np.asarray(x, np.float64)
  return {"fired": f64(fired), "early": f64(fired & (fire < half)), "fire_chunk": f64(fire),
          "half_chunk": f64(half), "cap_loss": f64(cap_loss), "loss_frac_at_fire": f64(frac)}


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  chunks = min(CHUNKS, steps)
  chunk_steps = steps // chunks
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  keys_S = harness.seed_keys(key, seeds)
  random_S = jax.vmap(lambda k: init_params(config, jax.random.fold_in(k, 1)))(keys_S)
  sets = {k: v for k, v in W.eval_sets(world, n=smoke.get("eval_n", EVAL_CAPABILITY)).items() if k in W.SKILLS}
  pool = W.collate(W.examples("behaviour", 1024, np.random.default_rng(7), world, preference=True))
  general, pref = held_out(world, smoke)
  lrs = {t: W.lr_for("qwen3", t, base_S) for t in sorted({t for _, t, _ in ARMS.values()})}
  starts = {"base": base_S, "random": random_S}
  cap0 = {name: capability_C(jax.tree.map(lambda x: x[None], s), sets, config)[:, 0] for name, s in starts.items()}
  out, reasons, trajectories = {}, {}, {}
  timing = collections.defaultdict(float)
  for arm, (start, target, warm) in ARMS.items():
    warmup = max(1.0, round(warm * chunks * chunk_steps))
    t0 = time.perf_counter()
    params_CxS, _ = jax.block_until_ready(train_chunks(config, starts[start], keys_S, pool, lrs[target]["lr"], warmup,
                                                       chunks, chunk_steps))
    t1 = time.perf_counter()
    cap_SxC = capability_C(params_CxS, sets, config)
    t2 = time.perf_counter()
    timing["train_s"] += t1 - t0
    timing["capability_s"] += t2 - t1
    aborts, firsts, ratios = [], [], []
    for s in range(seeds):
      params_C = [jax.tree.map(lambda x, c=c, s=s: x[c, s], params_CxS) for c in range(chunks)]
      a, why, ratio = guard_run(jax.tree.map(lambda x, s=s: x[s], starts[start]), params_C, config, general,
                                pref, chunk_steps)
      aborts.append(a)
      firsts.append(why)
      ratios.append(ratio)
    timing["monitor_guard_s"] += time.perf_counter() - t2
    out[arm] = timing_metrics(cap0[start], cap_SxC, np.stack(aborts))
    out[arm]["capability_final"] = cap_SxC[:, -1]
    # The perplexity ratio at the last eval before half the loss (1.0 = the start): a perplexity limit
    # fires before 50% of the loss only if it is below this.
    ratio_SxC = np.concatenate([np.ones((seeds, 1)), np.stack(ratios)], axis=1)
    out[arm]["ratio_before_half"] = np.take_along_axis(
        ratio_SxC, np.minimum(out[arm]["half_chunk"], chunks).astype(int)[:, None] - 1, 1)[:, 0]
    reasons[arm] = collections.Counter(r.split(":")[0] for why in firsts for r in why)
    trajectories[arm] = {"capability_mean_over_seeds": cap_SxC.mean(0),
                         "aborts_per_chunk": np.stack(aborts).sum(0)}
  notes = run_notes(out, reasons, lrs, cap0, seeds, chunks, chunk_steps)
  cfg = {"steps": steps, "chunks": chunks, "chunk_steps": chunk_steps, "batch_size": W.BATCH,
         "eval_capability_per_skill": smoke.get("eval_n", EVAL_CAPABILITY),
         "objective": "orpo", "gradient_mode": "full", "optimizer": "dreamjax.optim.apollo(rank=8)",
         "guard": str(guard_lib.GuardConfig()), "held_out": {"general": EVAL_GENERAL, "preference": EVAL_PREF},
         "lr_calibration": lrs, "base": base_info, "model": str(config), "seeds_vmapped": True,
         "trajectories": trajectories, "timing": dict(timing)}
  return harness.Outcome(data=out, config=cfg, notes=notes)


def run_notes(out, reasons, lrs, cap0, seeds, chunks, chunk_steps) -> list[str]:
  """Returns the computed notes: lr mapping, per-arm guard summary, the limit that would have helped."""
  notes = [f"lr mapping: ||Δθ||/||θ|| per step {t:g} → lr {v['lr']:.3g} (≈ lr {v['real_lr_equivalent']:.1g} "
           "on a 7B model)" for t, v in lrs.items()]
  notes.append("starting capability (mean over seeds, %): "
               + ", ".join(f"{k} {np.mean(v):.1f}" for k, v in cap0.items()))
  for arm in ARMS:
    o = out[arm]
    why = ", ".join(f"{k} ×{n}" for k, n in reasons[arm].most_common()) or "none"
    notes.append(f"{arm}: guard fired on {int(o['fired'].sum())}/{seeds} seeds (first-abort checks: {why}); "
                 f"median fire chunk {np.median(o['fire_chunk']):g}, median 50%-loss chunk "
                 f"{np.median(o['half_chunk']):g} (of {chunks}; {chunks + 1} = never); capability loss "
                 f"IQM {harness.stats.iqm(o['cap_loss']):.1f} pp")
  limit = guard_lib.GuardConfig().max_perplexity_ratio
  for arm in DESTRUCTIVE:
    o = out[arm]
    first = int((o["half_chunk"] == 1).sum())
    notes.append(f"{arm}: perplexity/ratio at the last eval before half the loss, median over seeds "
                 f"{np.median(o['ratio_before_half']):.3g} (GuardConfig limit {limit:g}); on {first}/{seeds} "
                 f"seeds half the loss came within the first chunk ({chunk_steps} steps), before any eval, so "
                 "no eval-based limit on this grid could have fired earlier there")
  return notes


SIMULATION = harness.Simulation(
    name="s4_small_steps_monitor",
    question="Does the project's drift guard (Monitor figures + Guard with default thresholds) fire on "
             "a run with a destructive learning rate before half of its eventual capability loss, "
             "while never firing on healthy small-step runs or on a random-init model?",
    prediction="small steps keep drift monitorable; the guard stops a bad run early",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed; capability "
          "= mean exact-match accuracy on 128 held-out examples per general skill; ORPO "
          "(full backprop) + APOLLO on diverse behaviour preference pairs, no replay; "
          f"{W.FINETUNE_STEPS} steps (quick {W.QUICK_FINETUNE_STEPS}) of batch 32 in 10 chunks; per-step ||Δθ||/||θ|| 5e-4 and 2e-3 (healthy), 1e-2 "
          "(intermediate), 5e-2 (destructive: constant, and after a linear warmup over the first 30% "
          "of the run); a random init trained at 2e-3. After every chunk the project's Monitor (64 "
          "held-out general examples, 64 held-out preference pairs) and Guard(GuardConfig()) decide; "
          "training continues so the eventual loss is observed. The default GuardConfig applies to every "
          "arm, the random init included (dreamjax.train.loop switches the drift checks off for a "
          "random-init preset; keeping them on is the stricter false-alarm test).",
    arms={"healthy_5e-4": "update size 5e-4/step (≈ lr 1e-5 on a 7B model)",
          "healthy_2e-3": "update size 2e-3/step (≈ lr 4e-5)",
          "mid_1e-2": "update size 1e-2/step (≈ lr 2e-4), reported only",
          "destructive_5e-2": "update size 5e-2/step (≈ lr 1e-3), constant: a bad run",
          "destructive_warmup": "update size 5e-2/step after a linear warmup over the first 30% of the run: "
                                "a bad run that degrades gradually",
          "random_init": "a random init (not pretrained) at 2e-3/step: false-alarm control"},
    criteria=[
        *[harness.Criterion(arm=arm, metric="early", statistic="mean", threshold=1.0, direction="greater",
                            description=f"{arm}: the guard fires before 50% of the capability loss on every "
                                        "seed (per-seed indicator; mean's CI lower end = 1)")
          for arm in DESTRUCTIVE],
        *[harness.Criterion(arm=arm, metric="fired", statistic="mean", threshold=0.0, direction="less",
                            description=f"{arm}: the guard never fires (per-seed indicator; mean's CI upper "
                                        "end = 0)")
          for arm in (*HEALTHY, "random_init")],
    ],
    controls=[
        *[harness.Control(kind="positive", arm=arm, metric="cap_loss", statistic="iqm", threshold=20.0,
                          direction="greater", description=f"{arm} loses more than 20 pp of general-skill "
                                                           "accuracy by the end (the run is bad)")
          for arm in DESTRUCTIVE],
        *[harness.Control(kind="negative", arm=arm, metric="cap_loss", statistic="iqm", threshold=5.0,
                          direction="less", description=f"{arm} loses at most 5 pp (the run is healthy, so a "
                                                        "firing would be a false alarm)")
          for arm in HEALTHY],
    ],
    effects=[
        *[harness.Effect(arm=arm, metric=m, statistic="iqm") for arm in DESTRUCTIVE
          for m in ("fire_chunk", "half_chunk", "loss_frac_at_fire", "ratio_before_half")],
        harness.Effect(arm="mid_1e-2", metric="cap_loss", statistic="iqm"),
        harness.Effect(arm="mid_1e-2", metric="fired", statistic="mean"),
        harness.Effect(arm="mid_1e-2", metric="early", statistic="mean"),
    ],
    amendment="The first full run (8 seeds) warmed destructive_warmup up over 50% of the run, and its "
              "positive control was INCONCLUSIVE (IQM capability loss 25.3 pp, 95% CI [17.5, 29.3] vs > 20). "
              "As the rules ask, the manipulation was strengthened (warmup over 30% of the run, the same "
              "5e-2 peak); no criterion or threshold changed.",
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=146,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
