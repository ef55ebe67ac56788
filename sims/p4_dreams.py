"""Prediction 4: training on dreamed recombinations of memories generalises better than real data alone.

A compositional task in `sims.world`: in context [BOS, actor a, situation s, 4 slot pairs, CUE_CLEAR]
the right response is [r(a, s), actor, EOS] with

    r(a, s) = ACCEPT if h(a) + k(s) ≤ 1,  SUGGEST if h(a) + k(s) = 2,  PUSHBACK if h(a) + k(s) ≥ 3

where h (how much the actor needs checking) and k (the situation's stakes) are fixed random
balanced maps of the 8 actors and 8 situations to {0, 1, 2}: the behaviour depends on who asks
*and* where (each behaviour is right on about a third of the pairs). The 64 (a, s) pairs are cut
by a random Latin square L (each colour class is one pair per actor and per situation) into

    real R = colours 0-2 (24 pairs)   test T = colours 3-4 (16 pairs)   dreamable D = colours 5-7 (24)

Every actor and situation occurs in R; T are combinations no arm ever trains on. Memories are the
real episodes, one per real pair, tagged `actor<a>`, `situation<s>`; `dreamjax.dream.memory
.build_graph` links memories sharing a tag, and `dreamjax.dream.walk.Walker` draws collisions of
two walks whose seeds are ≥ 2 hops apart (different actor and situation). A collision of walks
ending at memories (a1, s1) and (a2, s2) dreams the recombinations (a1, s2) and (a2, s1), labelled
by the world's rule r; a recombination that lands on a test pair is dropped (dreams never show T).
Arms, each a pool of 1024 preference pairs, trained with the project's ORPO + APOLLO step for the
same steps (`world.finetune`), matched by seed:

  real:    1024 real episodes (pairs R)
  dreams:  512 real + 512 dreamed episodes (walk collisions, rule labels)
  noise:   512 real + the same 512 dreamed contexts with uniformly random labels (rule broken)
  oracle:  512 real + 512 episodes of the test pairs T themselves (positive control)

Metric, per seed (fresh episodes, argmax of the first response token after a fresh forward pass):

  test = 100 · mean_{i ∈ T-episodes} [argmax p(r_0 | context_i) = r(a_i, s_i)]   (chance 100/3)

and the same on R (`real_pairs`) and D (`dream_pairs`). Criteria: IQM(dreams.test) −
IQM(real.test) ≥ 5 pp and IQM(dreams.test) − IQM(noise.test) > 0.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.dream import memory as memory_lib
from dreamjax.dream import walk as walk_lib
from dreamjax.train.batch import TokenizedExample
from sims import harness
from sims import world as W

TARGET = 5e-3  # per-step ||Δθ||/||θ|| (≈ lr 1e-4 on a 7B model)
POOL = 1024  # training examples per arm
TASK_SEED = 0  # the rule maps h, k and the Latin-square split (fixed: pools are shared by seeds)
CUE = W.CUE_CLEAR
BEHAVIOURS = (W.ACCEPT, W.PUSHBACK, W.SUGGEST)
BY_TOTAL = (W.ACCEPT, W.ACCEPT, W.SUGGEST, W.PUSHBACK, W.PUSHBACK)  # behaviour for h(a) + k(s) = 0..4
CHANCE = 100.0 / len(BEHAVIOURS)
COLOURS = {"real": (0, 1, 2), "test": (3, 4), "dream": (5, 6, 7)}
WALK = walk_lib.WalkConfig(length=2, restart_prob=0.15, temperature=1.0, n_walks=2, min_distance=2)
SMOKE = None  # tests set e.g. {'steps': 2, 'pretrain_steps': 2, 'eval_n': 8}


class Task:
  """The rule (h[a] + k[s] → behaviour) and the real / test / dreamable pair sets."""

  def __init__(self, seed: int = TASK_SEED):
    rng = np.random.default_rng(seed)
    self.h = rng.permutation(np.arange(W.N_ACTORS) % 3)  # balanced: each residue on 2-3 actors
    self.k = rng.permutation(np.arange(W.N_SITUATIONS) % 3)
    rows, cols, colour = rng.permutation(8), rng.permutation(8), rng.permutation(8)
    latin_AxS = colour[(rows[:, None] + cols[None, :]) % 8]
    self.pairs = {name: [(a, s) for a in range(W.N_ACTORS) for s in range(W.N_SITUATIONS)
                         if latin_AxS[a, s] in cs] for name, cs in COLOURS.items()}

  def label(self, a: int, s: int) -> int:
    return BY_TOTAL[int(self.h[a] + self.k[s])]


def episode(rng, a: int, s: int, chosen: int) -> TokenizedExample:
  """Returns a preference pair in (a, s): `chosen` behaviour over a random other one."""
  toks, _ = W.header(rng, actors=[a], situations=[s])
  rejected = int(rng.choice([b for b in BEHAVIOURS if b != chosen]))
  return TokenizedExample(context=toks + [CUE], chosen=[chosen, W.ACTOR0 + a, W.EOS],
                          rejected=[rejected, W.ACTOR0 + a, W.EOS])


def episodes(rng, task: Task, pairs, n: int):
  """Returns n rule-labelled episodes over `pairs`, drawn uniformly."""
  return [episode(rng, *pairs[i], task.label(*pairs[i])) for i in rng.integers(len(pairs), size=n)]


def memory_graph(task: Task) -> memory_lib.MemoryGraph:
  """Returns the memory graph of the real pairs: memories sharing an actor or a situation link."""
  mems = [memory_lib.Memory(id=f"a{a}s{s}", text=f"actor {a} gave a clear direction in situation {s}: "
                            f"the right response was behaviour {task.label(a, s)}",
                            tags=(f"actor{a}", f"situation{s}"), meta={"actor": a, "situation": s})
          for a, s in task.pairs["real"]]
  return memory_lib.build_graph(mems)


def dream_pairs(task: Task, n: int, rng) -> tuple[list, dict]:
  """Returns (n dreamed (a, s) pairs, stats): recombinations from walk collisions, test pairs dropped."""
  graph = memory_graph(task)
  walker = walk_lib.Walker(graph, WALK, rng)
  test = set(task.pairs["test"])
  out, collisions, dropped = [], 0, 0
  while len(out) < n:
    try:
      collision = walker.draw()
    except walk_lib.NoNewWalk:  # every node set seen: start a fresh night
      walker = walk_lib.Walker(graph, WALK, rng)
      continue
    collisions += 1
    m1, m2 = (graph.memories[w.path[-1]].meta for w in collision.walks)
    for a, s in ((m1["actor"], m2["situation"]), (m2["actor"], m1["situation"])):
      if (a, s) in test:
        dropped += 1
      elif len(out) < n:
        out.append((a, s))
  kinds = {name: sum(p in set(task.pairs[name]) for p in out) for name in ("real", "dream")}
  stats = {"collisions": collisions, "dropped_test_pairs": dropped, "dreams_on_real_pairs": kinds["real"],
           "dreams_on_novel_pairs": kinds["dream"],
           "novel_pairs_covered": len(set(out) & set(task.pairs["dream"])), "novel_pairs": len(task.pairs["dream"]),
           "node_coverage": walker.coverage().node_fraction}
  return out, stats


def pools(task: Task, world: W.World, n: int = POOL, seed: int = 31):
  """Returns ({arm: collated pool}, dream stats); every arm has n examples."""
  del world  # the rule lives in `task`; the header is world.header's layout
  rng = np.random.default_rng(seed)
  real = episodes(rng, task, task.pairs["real"], n)
  half = n // 2
  dreamed, stats = dream_pairs(task, n - half, np.random.default_rng(seed + 1))
  dreams = [episode(rng, a, s, task.label(a, s)) for a, s in dreamed]
  noise = [episode(rng, a, s, int(rng.choice(BEHAVIOURS))) for a, s in dreamed]
  oracle = episodes(rng, task, task.pairs["test"], n - half)
  arms = {"real": real, "dreams": real[:half] + dreams, "noise": real[:half] + noise,
          "oracle": real[:half] + oracle}
  return {arm: W.collate(exs) for arm, exs in arms.items()}, stats


@functools.partial(jax.jit, static_argnames=("config",))
def accuracy_S(params_S, batch, *, config):
  """Returns [S]: % of examples whose argmax first response token is the rule's behaviour."""
  def one(params):
    pred_B = jnp.argmax(W.response_logits(params, batch, config)[:, 0], axis=-1)
    return jnp.mean(pred_B == batch.chosen_BxR[:, 0]) * 100.0
  return jax.vmap(one)(params_S)


def run(seeds: int, quick: bool, key):
  smoke = SMOKE or {}
  steps = smoke.get("steps")  # None: world.finetune's shared step count
  pc = W.PretrainConfig(steps=smoke.get("pretrain_steps", W.PretrainConfig.steps))
  n_eval = smoke.get("eval_n", 256)
  config = W.model_config("qwen3")
  world = W.World.make(pc.world_seed)
  task = Task()
  base_S, base_info = W.pretrain("qwen3", seeds, pc)
  data, dream_stats = pools(task, world)
  eval_rng = np.random.default_rng(12345)
  sets = {f"{name}_pairs": W.collate(episodes(eval_rng, task, task.pairs[name], n_eval))
          for name in ("real", "dream")}
  sets["test"] = W.collate(episodes(eval_rng, task, task.pairs["test"], n_eval))
  lr = W.lr_for("qwen3", TARGET, base_S, pc=pc, quick=quick, steps=steps)
  keys_S = harness.seed_keys(key, seeds)
  out = {}
  for arm, pool in data.items():
    params_S, _ = W.finetune("qwen3", base_S, keys_S, pool, lr=lr["lr"], quick=quick, steps=steps)
    out[arm] = {name: np.asarray(accuracy_S(params_S, b, config=config)) for name, b in sets.items()}
  steps_used = steps or (W.QUICK_FINETUNE_STEPS if quick else W.FINETUNE_STEPS)
  cfg = {"steps": steps_used, "batch_size": W.BATCH, "pool": POOL, "objective": "orpo",
         "optimizer": "dreamjax.optim.apollo(rank=8)", "lr_calibration": lr, "rule_h": task.h, "rule_k": task.k,
         "rule": "h + k <= 1: ACCEPT, = 2: SUGGEST, >= 3: PUSHBACK",
         "pairs": task.pairs, "walk": dataclasses.asdict(WALK), "dreams": dream_stats, "eval_n": n_eval,
         "base": base_info, "seeds_vmapped": True}
  notes = [f"dreams: {dream_stats['collisions']} walk collisions gave {POOL - POOL // 2} recombinations, "
           f"{dream_stats['dreams_on_novel_pairs']} on novel pairs ({dream_stats['novel_pairs_covered']} of "
           f"{dream_stats['novel_pairs']} covered), {dream_stats['dreams_on_real_pairs']} repeating a real pair; "
           f"{dream_stats['dropped_test_pairs']} landing on test pairs dropped",
           f"lr {lr['lr']:.3g} for ||Δθ||/||θ|| {TARGET:g}/step; chance = {CHANCE:.1f}%"]
  return harness.Outcome(data=out, config=cfg, notes=notes)


SIMULATION = harness.Simulation(
    name="p4_dreams",
    question="Does adding dreamed recombinations of memories (random-walk collisions over a memory graph) "
             "to real data improve accuracy on combinations never seen, more than real data or noise of "
             "the same count?",
    prediction="dreamed recombinations generalise better than real-only",
    setup="sims.world, Qwen3-style tiny decoder (2 layers, d=48, vocab 64) pretrained per seed; a "
          "compositional rule: behaviour = ACCEPT / SUGGEST / PUSHBACK as h(actor) + k(situation) is "
          "≤ 1 / = 2 / ≥ 3; real data cover 24 of 64 actor×situation pairs, 16 are held out for test, "
          "dreams recombine real memories via dreamjax.dream.walk collisions over a dreamjax.dream.memory "
          "graph; ORPO (full backprop) + APOLLO via world.finetune, per-step ||Δθ||/||θ|| = 5e-3; every "
          "arm 1024 examples, same steps.",
    arms={"real": "1024 real episodes (the 24 real pairs)",
          "dreams": "512 real + 512 walk-collision recombinations, labelled by the rule",
          "noise": "512 real + the same 512 recombined contexts with random labels",
          "oracle": "512 real + 512 episodes of the test pairs (positive control: the metric can move)"},
    criteria=[
        harness.Criterion(arm="dreams", metric="test", statistic="iqm_diff", baseline="real", threshold=5.0,
                          direction="greater",
                          description="held-out compositional accuracy: dreams − real ≥ 5 pp"),
        harness.Criterion(arm="dreams", metric="test", statistic="iqm_diff", baseline="noise", threshold=0.0,
                          direction="greater", description="dreams beat noise of the same count"),
    ],
    controls=[
        harness.Control(kind="positive", arm="oracle", metric="test", statistic="iqm_diff", baseline="real",
                        threshold=5.0, direction="greater",
                        description="training on the test combinations themselves beats real by ≥ 5 pp"),
    ],
    effects=[
        harness.Effect(arm="real", metric="test", statistic="iqm"),
        harness.Effect(arm="real", metric="real_pairs", statistic="iqm"),
        harness.Effect(arm="dreams", metric="dream_pairs", statistic="iqm_diff", baseline="real"),
        harness.Effect(arm="noise", metric="test", statistic="iqm_diff", baseline="real"),
        harness.Effect(arm="dreams", metric="test", statistic="prob_improvement", baseline="real"),
    ],
    amendment="Disclosed design change before the first full run, made after a quick development run: the "
              "compositional rule was (h(actor) + k(situation)) mod 3, which the quick path could not learn "
              "even on the real pairs (and dreams scored below real there); the rule became the ordinal one "
              "above. The criteria and controls were not changed.",
    run=run,
    seeds=8,
    quick_seeds=3,
    cost=89,  # seconds of the 2026-11-23 full run, commit 7bbc8c6 (orders the work only)
)
