"""x5: rejected examples sampled from the model itself (on-policy) beat ones from another model.

Each seed's cached Qwen3-style base (`sims.world.pretrain`) says the default SUGGEST to every cue.
The target behaviour differs from it on two cues (clear direction → ACCEPT, wrong direction →
PUSHBACK), so the training contexts are 512 episodes of those cues with chosen = the target
answer [b(cue), actor, EOS]. Only the rejected answer differs between arms, and every arm has the
same contexts, chosen answers and count (matched counts):

  on_t05, on_t1, on_t2: rejected = a sample of the seed's own base model at temperature 0.5, 1, 2
  off:                  rejected = a sample (temperature 1) of another model: a randomly initialised
                        model of the same architecture, drawn per seed (its answers are not the policy's)

Samples come from the project's sampler (`dreamjax.model.sample.generate`, 3 new tokens, stop at
EOS), vmapped over seeds, so every seed has its own pool. Training is the project's DPO (β = 0.1,
reference = the base) through its train step (`world.finetune_seeds`), full backprop, APOLLO, seeds
vmapped with the pool a traced per-seed argument of the suite's shared fine-tuning program (`sims.engine`).

Metrics, per seed:
  gain = acc(final) − acc(base): exact-match accuracy (%) of the target answer on 256 held-out
         episodes of the two cues (fresh contexts; `world.correct_B`)
  kl   = mean over held-out contexts x of KL(π_θ(·|x) ‖ π_base(·|x)) for the first response token
         (nats), over the held-out sets of every skill and every cue (`world.eval_sets`)
  same = % of the pool's rejected answers equal to the chosen one (DPO gets no gradient from them)
  best_arm_gain = max over the four arms of gain, per seed (stored on on_t1; read by the control)
The criterion's threshold is 1 pp rather than 0: a rule passes when its CI's lower end equals the
threshold, so 0 would count a tie (both gains 0) as on-policy winning.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.model import init_params
from dreamjax.model.sample import generate
from dreamjax.train.batch import PreferenceBatch, TokenizedExample
from sims import harness
from sims import world as W

TARGET = 5e-3  # per-step ||Δθ||/||θ|| of the shared ORPO calibration (as x4)
TEMPERATURES = {"on_t05": 0.5, "on_t1": 1.0, "on_t2": 2.0}
OFF_TEMPERATURE = 1.0
STEPS, QUICK_STEPS = 60, 30
BATCH = 16
POOL = 512
CUES = (W.CUE_CLEAR, W.CUE_WRONG)  # the cues whose target differs from the base's answer
SMOKE = None  # tests set {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


def target_examples(n: int, rng, world: W.World) -> list[TokenizedExample]:
  """Returns n target-behaviour examples (chosen only) alternating the two cues."""
  return [W.behaviour_example(rng, world, cue=CUES[i % len(CUES)]) for i in range(n)]


@functools.partial(jax.jit, static_argnames=("config",))
def sample_rejected(params_S, keys_S, batch: PreferenceBatch, temperature, *, config):
  """Returns (tokens [S, B, R], mask [S, B, R]): one sampled answer per context, per seed's model."""
  def one(params, key):
    g = generate(params, config, (batch.context_BxC, batch.context_mask_BxC), W.RESPONSE_LEN,
                 temperature=temperature, key=key, stop_tokens=(W.EOS,), pad_id=W.PAD)
    mask = (jnp.arange(W.RESPONSE_LEN)[None, :] < g.lengths_B[:, None]).astype(jnp.int32)
    return jnp.where(mask > 0, g.tokens_BxN, W.PAD), mask
  return jax.vmap(one)(params_S, keys_S)


def with_rejected(batch: PreferenceBatch, tokens_SxBxR, mask_SxBxR) -> PreferenceBatch:
  """Returns the batch broadcast to [S, ...] with per-seed rejected answers."""
  s = tokens_SxBxR.shape[0]
  tiled = jax.tree.map(lambda x: jnp.broadcast_to(x, (s,) + x.shape), batch)
  return tiled.replace(rejected_BxR=tokens_SxBxR, rejected_mask_BxR=mask_SxBxR,
                       is_preference_B=jnp.ones_like(tiled.is_preference_B))


@functools.partial(jax.jit, static_argnames=("config",))
def first_token_kl(params, base, batch, *, config):
  """Returns mean_x KL(π_θ(·|x) ‖ π_base(·|x)) of the first response token (nats)."""
  lp = jax.nn.log_softmax(W.response_logits(params, batch, config)[:, 0], axis=-1)
  lq = jax.nn.log_softmax(W.response_logits(base, batch, config)[:, 0], axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps", QUICK_STEPS if quick else STEPS)
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  n_eval = smoke.get("eval_n", 256)
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  lr = W.lr_for("qwen3", TARGET, base_S, pc=pc, quick=quick, steps=smoke.get("steps"))
  pool = W.collate(target_examples(POOL, np.random.default_rng(51), world))
  target_set = W.collate(target_examples(n_eval, np.random.default_rng(5151), world))
  kl_sets = W.eval_sets(world, n=n_eval)
  keys_S = harness.seed_keys(key, seeds)
  sample_keys = lambda tag: jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys_S)
  other_S = jax.vmap(lambda k: init_params(config, jax.random.fold_in(k, 777)))(keys_S)
  sources = {arm: (base_S, t) for arm, t in TEMPERATURES.items()}
  sources["off"] = (other_S, OFF_TEMPERATURE)
  acc = lambda p: np.asarray(jax.vmap(lambda q: W.correct_B(q, target_set, config=config).mean() * 100.0)(p))
  acc_base = acc(base_S)
  kl_fn = jax.vmap(lambda p, b0, batch: first_token_kl(p, b0, batch, config=config), in_axes=(0, 0, None))
  out, same = {}, {}
  for i, (arm, (model_S, temperature)) in enumerate(sources.items()):
    toks, mask = sample_rejected(model_S, sample_keys(i), pool, jnp.float32(temperature), config=config)
    pools_S = with_rejected(pool, toks, mask)
    equal = jnp.all((toks == pool.chosen_BxR[None]) & (mask == pool.chosen_mask_BxR[None]), axis=-1)
    same[arm] = np.asarray(equal.mean(axis=1)) * 100.0
    params_S, _ = W.finetune_seeds(config, base_S, keys_S, pools_S, lr=lr["lr"], steps=steps, batch_size=BATCH,
                                   objective="dpo")
    kl = np.mean([np.asarray(kl_fn(params_S, base_S, b)) for b in kl_sets.values()], axis=0)
    out[arm] = {"gain": acc(params_S) - acc_base, "kl": kl, "same": same[arm]}
  out["on_t1"]["best_arm_gain"] = np.max(np.stack([m["gain"] for m in out.values()]), axis=0)
  cfg = {"steps": steps, "batch_size": BATCH, "pool": POOL, "objective": "dpo", "beta": 0.1,
         "temperatures": TEMPERATURES, "off_policy_model": "random init (fold_in(seed key, 777)), T = 1",
         "lr_calibration": lr, "eval_n": n_eval, "base": base_info, "seeds_vmapped": True}
  notes = [f"lr {lr['lr']:.3g} (ORPO calibration, ||Δθ||/||θ|| {TARGET:g}/step) for every arm",
           f"base accuracy on the two cues' target answers (mean over seeds): {np.mean(acc_base):.1f}%",
           "rejected equal to chosen (% of pool, mean over seeds): " + ", ".join(
               f"{a} {np.mean(v):.1f}" for a, v in same.items())]
  return harness.Outcome(data=out, config=cfg, notes=notes)


SIMULATION = harness.Simulation(
    name="x5_on_policy",
    question="With the same contexts, chosen answers and counts, does DPO learn the target behaviour more when "
             "the rejected answers are the model's own samples than when they come from another model?",
    prediction="on-policy rejected examples beat off-policy",
    setup="sims.world, Qwen3-style tiny decoder pretrained per seed (default answer SUGGEST to every cue); DPO "
          "(β = 0.1, reference = base), APOLLO, full backprop, 60 steps × batch 16 (quick: 30) at update 5e-3/step "
          "(ORPO calibration); 512 clear/wrong-direction episodes, chosen = the target; rejected = a sample "
          "(dreamjax generate) of the seed's base at T = 0.5/1/2, or of a randomly initialised model at T = 1.",
    arms={"on_t05": "rejected sampled from the base itself at temperature 0.5",
          "on_t1": "rejected sampled from the base itself at temperature 1",
          "on_t2": "rejected sampled from the base itself at temperature 2",
          "off": "rejected sampled from another model (random init) at temperature 1"},
    criteria=[
        harness.Criterion(arm="on_t1", baseline="off", metric="gain", statistic="iqm_diff", threshold=1.0,
                          direction="greater",
                          description="on-policy (T = 1) gain − off-policy gain > 0: 95% CI at or above 1 pp"),
    ],
    controls=[
        harness.Control(kind="positive", arm="on_t1", metric="best_arm_gain", statistic="iqm", threshold=20.0,
                        direction="greater",
                        description="DPO can teach the behaviour in this budget from some rejection source: the "
                                    "best arm's gain ≥ 20 pp (else every gain sits on the floor)"),
    ],
    effects=[
        harness.Effect(arm="on_t05", baseline="off", metric="gain", statistic="iqm_diff"),
        harness.Effect(arm="on_t2", baseline="off", metric="gain", statistic="iqm_diff"),
        harness.Effect(arm="on_t1", baseline="off", metric="gain", statistic="prob_improvement"),
        harness.Effect(arm="on_t1", baseline="off", metric="kl", statistic="iqm_diff"),
        *[harness.Effect(arm=a, metric=m, statistic="iqm") for a in ("on_t05", "on_t1", "on_t2", "off")
          for m in ("gain", "kl")],
    ],
    amendment="Before the first full run: the positive control first read on_t1's own gain (≥ 20 pp). A quick "
              "development run showed DPO with the model's own T = 1 samples barely learns the behaviour, so that "
              "control conflated the quantity under test with the setup's sensitivity; it now reads the best arm's "
              "gain per seed (same threshold). The criterion's threshold is 1 pp instead of 0 so that a tie does "
              "not pass. No manipulation changed.",
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=49,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
