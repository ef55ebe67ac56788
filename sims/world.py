"""The shared synthetic token world of the prediction simulations: skills, behaviour, base models.

Every example is a context of tokens and a response:

    context  = [BOS, actor, situation, s_a, v_a, s_b, v_b, s_c, v_c, s_d, v_d, <task tokens>]
    response = [answer tokens..., EOS]

The four (slot name, value) pairs appear in a fixed order (a random order, which forces content
addressing, needed ~10x the pretraining steps this CPU budget allows). The tasks:

- context QA ("qa"):        task = [QA, s_j]          response = [v_j, EOS]
- modular arithmetic ("arith"): task = [ARITH, a, b]   response = [(a + b) mod P, EOS]
- memorised facts ("fact"): task = [FACT, e]           response = [fact(e), EOS]
- behaviour ("behaviour"):  task = [cue]               response = [b(cue), actor, EOS]

QA, arithmetic and facts are the general skills, the "basin" the base model is pretrained into.
The behaviour maps (context, cue) to a response that names the actor from the context:

    target:   clear direction → ACCEPT,  wrong direction → PUSHBACK,  vague → SUGGEST
    default:  SUGGEST for every cue (what the base model is pretrained to say)

Preference pairs take the target as chosen and, as rejected, the default where it differs
(clear: SUGGEST) or the wrong behaviour (wrong: ACCEPT, the sycophantic yes; vague: ACCEPT).

Accuracy is exact match of the greedy (argmax) response tokens under teacher forcing, after a
fresh forward pass of context + response (`correct_B`); a constant predictor scores chance.

A base model is pretrained once per seed with the project's own train step (`objective='sft'`)
on the general skills plus the default behaviour, and cached as
`<cache>/base_<family>_<seed>_<hash>.npz` (the hash covers the world, model and pretraining
settings, so a stale file is never reused). Learning rates are set by update size: `lr_for`
returns the lr whose per-step relative update ||Δθ||/||θ|| hits a target, since raw learning
rates do not carry over from 7B models to these tiny ones (45.6k parameters Qwen3-style, 52.9k
Qwen3.5-style).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamjax.model import LINEAR, FULL, ModelConfig, forward, init_params, positions_from_mask
from dreamjax.train import batch as batch_lib
from dreamjax.train.batch import PreferenceBatch, TokenizedExample
from dreamjax.train.step import init_train_state, make_train_step
from sims import engine

# ---------------------------------------------------------------------------------------------
# Vocabulary.

PAD, BOS, EOS = 0, 1, 2
QA, ARITH, FACT = 3, 4, 5
CUE_CLEAR, CUE_WRONG, CUE_VAGUE = 6, 7, 8
ACCEPT, PUSHBACK, SUGGEST = 9, 10, 11
SLOT0, N_SLOTS = 12, 4
VALUE0, N_VALUES = 16, 16
ACTOR0, N_ACTORS = 32, 8
SIT0, N_SITUATIONS = 40, 8
ENTITY0, N_ENTITIES = 48, 16
VOCAB = 64
MODULUS = 7  # arithmetic over the first MODULUS value tokens

CUES = (CUE_CLEAR, CUE_WRONG, CUE_VAGUE)
TARGET = {CUE_CLEAR: ACCEPT, CUE_WRONG: PUSHBACK, CUE_VAGUE: SUGGEST}
DEFAULT = {CUE_CLEAR: SUGGEST, CUE_WRONG: SUGGEST, CUE_VAGUE: SUGGEST}
REJECTED = {CUE_CLEAR: SUGGEST, CUE_WRONG: ACCEPT, CUE_VAGUE: ACCEPT}
SKILLS = ("qa", "arith", "fact")  # the general skills (the basin); strata of forgetting
CONTEXT_LEN = 14  # longest context: 11 header tokens + [ARITH, a, b]
RESPONSE_LEN = 3  # longest response: [behaviour, actor, EOS]


@dataclasses.dataclass(frozen=True)
class World:
  """The fixed facts of one world: entity e's memorised value is VALUE0 + facts[e]."""

  facts: tuple[int, ...]  # [N_ENTITIES] value indices in [0, N_VALUES)

  @classmethod
  def make(cls, seed: int = 0) -> "World":
    rng = np.random.default_rng(seed)
    return cls(facts=tuple(int(v) for v in rng.integers(0, N_VALUES, N_ENTITIES)))


def behaviour(context: Sequence[int], cue: int, default: bool = False) -> list[int]:
  """Returns the response to `cue` in `context`: [TARGET[cue] (or DEFAULT), actor, EOS]."""
  actor = context[1]
  return [(DEFAULT if default else TARGET)[cue], actor, EOS]


def header(rng: np.random.Generator, actors: Optional[Sequence[int]] = None,
           situations: Optional[Sequence[int]] = None, values: Optional[Sequence[int]] = None):
  """Returns (context header tokens, {slot token: value token}) of a random episode.

  actors/situations/values restrict the draws to those indices (narrow data); None: any.
  """
  actor = ACTOR0 + int(rng.choice(actors if actors is not None else N_ACTORS))
  situation = SIT0 + int(rng.choice(situations if situations is not None else N_SITUATIONS))
  slots = np.arange(N_SLOTS)  # fixed order: a random order needs ~10x the pretraining on CPU
  vals = rng.choice(values if values is not None else N_VALUES, N_SLOTS)
  table = {SLOT0 + int(s): VALUE0 + int(v) for s, v in zip(slots, vals)}
  toks = [BOS, actor, situation]
  for s, v in table.items():
    toks += [s, v]
  return toks, table


def qa_example(rng, world: World, **kw) -> TokenizedExample:
  """Context QA: read the value of one slot back."""
  del world
  toks, table = header(rng, **kw)
  slot = SLOT0 + int(rng.integers(N_SLOTS))
  return TokenizedExample(context=toks + [QA, slot], chosen=[table[slot], EOS])


def arith_example(rng, world: World, **kw) -> TokenizedExample:
  """Modular arithmetic: (a + b) mod MODULUS over value tokens."""
  del world
  toks, _ = header(rng, **kw)
  a, b = (int(x) for x in rng.integers(0, MODULUS, 2))
  return TokenizedExample(context=toks + [ARITH, VALUE0 + a, VALUE0 + b],
                          chosen=[VALUE0 + (a + b) % MODULUS, EOS])


def fact_example(rng, world: World, **kw) -> TokenizedExample:
  """A memorised fact: entity e → its value (independent of the context header)."""
  toks, _ = header(rng, **kw)
  e = int(rng.integers(N_ENTITIES))
  return TokenizedExample(context=toks + [FACT, ENTITY0 + e], chosen=[VALUE0 + world.facts[e], EOS])


def behaviour_example(rng, world: World, *, cue: Optional[int] = None, default: bool = False,
                      preference: bool = False, **kw) -> TokenizedExample:
  """A behaviour example: SFT on the target (or the default), or a preference pair.

  preference=True: chosen = target, rejected = REJECTED[cue] (the default or the wrong behaviour).
  """
  del world
  toks, _ = header(rng, **kw)
  cue = int(rng.choice(CUES)) if cue is None else cue
  context = toks + [cue]
  chosen = behaviour(context, cue, default=default)
  rejected = [REJECTED[cue], context[1], EOS] if preference else None
  return TokenizedExample(context=context, chosen=chosen, rejected=rejected)


GENERATORS: dict[str, Callable[..., TokenizedExample]] = {
    "qa": qa_example, "arith": arith_example, "fact": fact_example, "behaviour": behaviour_example}


def examples(kind: str, n: int, rng, world: World, **kw) -> list[TokenizedExample]:
  """Returns n examples of one kind ('qa' | 'arith' | 'fact' | 'behaviour')."""
  return [GENERATORS[kind](rng, world, **kw) for _ in range(n)]


def pretrain_mix(n: int, rng, world: World) -> list[TokenizedExample]:
  """Returns n pretraining examples: the three skills and the default behaviour, a quarter each."""
  kinds = rng.integers(0, 4, n)
  out = []
  for k in kinds:
    if k < 3:
      out.append(GENERATORS[SKILLS[k]](rng, world))
    else:
      out.append(behaviour_example(rng, world, default=True))
  return out


def collate(exs: Sequence[TokenizedExample]) -> PreferenceBatch:
  """Returns the world's examples as one PreferenceBatch of shapes (N, 14) and (N, 3)."""
  return batch_lib.collate(exs, CONTEXT_LEN, RESPONSE_LEN, pad_id=PAD)


def eval_sets(world: World, n: int = 256, seed: int = 12345, **kw) -> dict[str, PreferenceBatch]:
  """Returns fixed held-out evaluation batches: each skill, and the target behaviour per cue."""
  rng = np.random.default_rng(seed)
  out = {k: collate(examples(k, n, rng, world, **kw)) for k in SKILLS}
  out["behaviour"] = collate([behaviour_example(rng, world, cue=CUES[i % 3], **kw) for i in range(n)])
  return out


# ---------------------------------------------------------------------------------------------
# Evaluation (jitted; vmap over seeds' params with `jax.vmap(..., in_axes=(0, None))`).


def response_logits(params, batch: PreferenceBatch, config: ModelConfig, return_hidden: bool = False):
  """Returns logits_BxRxV predicting chosen_BxR after a fresh forward of context + chosen[:-1]."""
  c = batch.context_BxC.shape[1]
  inp = jnp.concatenate([batch.context_BxC, batch.chosen_BxR[:, :-1]], axis=1)
  mask = jnp.concatenate([batch.context_mask_BxC, batch.chosen_mask_BxR[:, :-1]], axis=1)
  out = forward(params, inp, positions_from_mask(mask), mask, config=config, return_hidden=return_hidden)
  if return_hidden:
    return out.logits[:, c - 1:], out.hidden
  return out.logits[:, c - 1:]


@functools.partial(jax.jit, static_argnames=("config",))
def correct_B(params, batch: PreferenceBatch, *, config: ModelConfig):
  """Returns 1.0 per example whose argmax tokens equal every real chosen token, else 0.0."""
  pred_BxR = jnp.argmax(response_logits(params, batch, config), axis=-1)
  return exact_match_B(pred_BxR, batch)


def exact_match_B(pred_BxR, batch: PreferenceBatch):
  """Returns 1.0 where pred equals chosen on every unmasked response position."""
  ok = (pred_BxR == batch.chosen_BxR) | (batch.chosen_mask_BxR == 0)
  return jnp.all(ok, axis=1).astype(jnp.float32)


def accuracies(params, sets: dict, config: ModelConfig) -> dict:
  """Returns {set name: accuracy in %} (params may carry a leading seed axis: then [S])."""
  leading = params["embed"].ndim == 3
  return _accuracies_fn(config, leading)(params, sets)


@functools.lru_cache(maxsize=None)
def _accuracies_fn(config: ModelConfig, leading: bool):
  """Returns jit(f): (params, sets) → {name: accuracy %}, every set in one call (vmapped over seeds)."""
  def one(p, sets):
    return {name: correct_B(p, b, config=config).mean() * 100.0 for name, b in sets.items()}
  return jax.jit(jax.vmap(one, in_axes=(0, None)) if leading else one)


@functools.partial(jax.jit, static_argnames=("config",))
def context_features(params, batch: PreferenceBatch, *, config: ModelConfig):
  """Returns the final residual stream at the last context token, (B, D): the context's encoding."""
  c = batch.context_BxC.shape[1]
  hidden = forward(params, batch.context_BxC, positions_from_mask(batch.context_mask_BxC),
                   batch.context_mask_BxC, config=config, head=False, return_hidden=True).hidden
  return hidden[-1][:, c - 1]


def linear_cka(x_BxD, y_BxE):
  """Returns linear CKA = ||Yᵀ X||_F² / (||Xᵀ X||_F ||Yᵀ Y||_F) on centred features (Kornblith 2019)."""
  x = x_BxD - x_BxD.mean(0)
  y = y_BxE - y_BxE.mean(0)
  xy = jnp.sum((y.T @ x) ** 2)
  return xy / (jnp.sqrt(jnp.sum((x.T @ x) ** 2)) * jnp.sqrt(jnp.sum((y.T @ y) ** 2)) + 1e-12)


def linear_probe_accuracy(x_BxD, labels_B, n_classes: int, ridge: float = 1e-2):
  """Returns the held-out accuracy (%) of a ridge-regression linear probe on features.

  The first half of the rows fits W = (XᵀX + λI)⁻¹ Xᵀ Y (X centred and with a bias column, Y one-hot),
  the second half is classified by argmax(X W): is the label linearly decodable from x?
  """
  n = x_BxD.shape[0] // 2
  mu = x_BxD[:n].mean(0)
  x = jnp.concatenate([x_BxD - mu, jnp.ones((x_BxD.shape[0], 1), x_BxD.dtype)], axis=1)
  y = jax.nn.one_hot(labels_B, n_classes, dtype=x.dtype)
  xt, yt = x[:n], y[:n]
  w = jnp.linalg.solve(xt.T @ xt + ridge * n * jnp.eye(x.shape[1], dtype=x.dtype), xt.T @ yt)
  pred = jnp.argmax(x[n:] @ w, axis=-1)
  return jnp.mean((pred == labels_B[n:]).astype(jnp.float32)) * 100.0


# ---------------------------------------------------------------------------------------------
# Models, training, and the base-model cache.

FAMILIES = ("qwen3", "qwen3_5")


def model_config(family: str) -> ModelConfig:
  """Returns the tiny decoder of a family: the project's preset shrunk to 2 layers, vocab 64.

  Its 2 layers run as a Python loop, not a layer scan (scan_layers=False: the same computation):
  at this depth the loop compiles faster (one ORPO + APOLLO step, frozen / full: 4.4 / 3.4 against
  5.5 / 4.0 CPU-s scanned, Qwen3 family, XLA level 1), and the suite is compilation-bound.
  """
  if family == "qwen3":
    return ModelConfig.preset("qwen3-tiny").replace(vocab_size=VOCAB, scan_layers=False)
  if family == "qwen3_5":
    return ModelConfig.preset("qwen3_5-tiny").replace(vocab_size=VOCAB, num_layers=2, layer_types=(LINEAR, FULL),
                                                      scan_layers=False)
  raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def sample_batch(pool: PreferenceBatch, key, batch_size: int) -> PreferenceBatch:
  """Returns batch_size examples drawn uniformly (with replacement) from a collated pool."""
  n = pool.context_BxC.shape[0]
  idx = jax.random.randint(key, (batch_size,), 0, n)
  return jax.tree.map(lambda x: x[idx], pool)


def train(config: ModelConfig, params, optimizer, pool: PreferenceBatch, key, *, steps: int,
          batch_size: int, objective: str = "sft", gradient_mode: str = "full",
          objective_kwargs: Optional[dict] = None, nll_on_prompt: bool = False,
          return_rel_update: bool = False, active_steps=None):
  """Returns (params, loss per step [steps]) after `steps` project train steps on pool draws.

  A `lax.scan` over `dreamjax.train.step.make_train_step`; step i's batch is drawn with
  fold_in(key, i), so the key fixes the data order. Pure and traceable: vmap it over seeds. The
  base models' pretraining (`pretrain`); the simulations fine-tune through `sims.engine`, whose one
  program per (config, gradient mode, batch size) takes every arm setting as a traced argument.
  return_rel_update: also return each step's ||Δθ_t|| / ||θ_t|| [steps].
  objective 'dpo' / 'dpop' use the starting params as the frozen reference model.
  active_steps: a traced int; steps i ≥ active_steps are skipped (state unchanged, loss and
    relative update 0) at no compute, so a short run reuses a long run's compile.
  """
  step_fn = make_train_step(config, objective, optimizer, gradient_mode, donate=False,
                            objective_kwargs=objective_kwargs, nll_on_prompt=nll_on_prompt)
  state = init_train_state(params, optimizer)

  ref = params if objective in ("dpo", "dpop") else None  # the reference model: the starting point

  def body(state, i):
    norm = optax.tree.norm(state.params)
    batch = sample_batch(pool, jax.random.fold_in(key, i), batch_size)
    state, metrics = step_fn(state, batch) if ref is None else step_fn(state, batch, ref)
    return state, (metrics["loss"], metrics["update_norm"] / norm)

  if active_steps is not None:  # an unbatched predicate: under vmap this stays a real branch
    run, skip = body, lambda state, i: (state, (jnp.float32(0.0), jnp.float32(0.0)))
    body = lambda state, i: jax.lax.cond(i < active_steps, run, skip, state, i)
  state, (loss, rel) = jax.lax.scan(body, state, jnp.arange(steps))
  return (state.params, loss, rel) if return_rel_update else (state.params, loss)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Settings of the base model's pretraining (part of the cache key)."""

  steps: int = 400  # SFT steps
  batch_size: int = 32
  lr: float = 3e-3  # AdamW peak, cosine-decayed to 10% (the base is not under study)
  pool: int = 4096  # examples in the pretraining pool
  world_seed: int = 0


def cache_dir() -> str:
  """Returns the base-model cache folder: $DREAMJAX_SIMS_CACHE, or sims_out/cache."""
  return os.environ.get("DREAMJAX_SIMS_CACHE", os.path.join("sims_out", "cache"))


# Bumped whenever the pretraining computation changes its floating-point result, so that a cache
# built by older code is never mixed with new bases. 2: the SFT step skips the rejected pass.
# 3: blocks of 4 seeds (was 8), and the block size is part of the key. 4: stacked, scanned layers
# and blockwise attention (dreamjax.model.layout, attention).
CACHE_VERSION = 4


def xla_backend_level() -> Optional[int]:
  """Returns the --xla_backend_optimization_level set in $XLA_FLAGS (the last one), or None (XLA's default)."""
  found = re.findall(r"--xla_backend_optimization_level=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(found[-1]) if found else None


def _cache_path(family: str, seed: int, pc: PretrainConfig) -> str:
  # The XLA backend level changes float rounding, so bases pretrained at one level are not reused at another.
  level = xla_backend_level()
  blob = json.dumps([dataclasses.asdict(model_config(family)), dataclasses.asdict(pc), VOCAB,
                     MODULUS, CONTEXT_LEN, CACHE_VERSION, PRETRAIN_BLOCK]
                    + ([] if level is None else [{"xla_backend_level": level}]), sort_keys=True, default=str)
  digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
  return os.path.join(cache_dir(), f"base_{family}_{seed}_{digest}.npz")


def _save(path: str, params) -> None:
  leaves, _ = jax.tree.flatten(params)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, *[np.asarray(x) for x in leaves])
  os.replace(tmp, path)


def _load(path: str, like):
  leaves, treedef = jax.tree.flatten(like)
  with np.load(path) as f:
    loaded = [jnp.asarray(f[f"arr_{i}"]) for i in range(len(leaves))]
  return jax.tree.unflatten(treedef, loaded)


PRETRAIN_BLOCK = 4  # seeds pretrained together (see `pretrain`): the full run's 8 are two blocks, --quick's 3 one

# Simulations may run in parallel threads (`harness.run_suite(jobs=...)`): what is computed once per
# process and shared (base models, lr probes, x6's phase 1) goes through `once` or a lock.
_LOCK = threading.Lock()
_KEY_LOCKS: dict = {}


def _lock_for(*key) -> threading.Lock:
  with _LOCK:
    return _KEY_LOCKS.setdefault(key, threading.Lock())


def once(table: dict, key, compute: Callable[[], object]):
  """Returns table[key], computed by compute() on first use; a concurrent caller waits for it."""
  with _lock_for(id(table), key):
    if key not in table:
      table[key] = compute()
  return table[key]


def pretrain(family: str, seeds: int, pc: PretrainConfig = PretrainConfig()):
  """Returns (params with a leading [seeds] axis, info): base models, from the cache when there.

  Seed s is initialised and ordered by PRNGKey(s) (independent of any simulation's key, so every
  simulation shares the same bases). Seeds are pretrained in fixed blocks of PRETRAIN_BLOCK
  (seed s with the others of block s // PRETRAIN_BLOCK, one vmapped call), so a base model does
  not depend on which seeds a run happened to ask for first: the vmap batch size changes
  floating-point rounding, and a cache filled in other groupings would give other numbers.
  """
  with _lock_for("pretrain", family):  # one thread pretrains a family; the others wait for its files
    return _pretrain(family, seeds, pc)


def _pretrain(family: str, seeds: int, pc: PretrainConfig):
  config = model_config(family)
  world = World.make(pc.world_seed)
  like = init_params(config, jax.random.PRNGKey(0))
  paths = [_cache_path(family, s, pc) for s in range(seeds)]
  missing = [s for s, p in enumerate(paths) if not os.path.exists(p)]
  t0 = time.perf_counter()
  blocks = sorted({s // PRETRAIN_BLOCK for s in missing})
  if missing:
    pool = collate(pretrain_mix(pc.pool, np.random.default_rng(pc.world_seed + 1), world))
    sched = optax.cosine_decay_schedule(pc.lr, pc.steps, alpha=0.1)
    optimizer = optax.adamw(sched, weight_decay=0.0)

    def pretrain_seed(key):
      params = init_params(config, key)
      return train(config, params, optimizer, pool, jax.random.fold_in(key, 1), steps=pc.steps,
                   batch_size=pc.batch_size)[0]

    fn = jax.jit(jax.vmap(pretrain_seed))
    for b in blocks:
      block = range(b * PRETRAIN_BLOCK, (b + 1) * PRETRAIN_BLOCK)
      new = fn(jnp.stack([jax.random.PRNGKey(s) for s in block]))
      for i, s in enumerate(block):
        path = _cache_path(family, s, pc)
        if not os.path.exists(path):
          _save(path, jax.tree.map(lambda x, i=i: x[i], new))
  params = [_load(p, like) for p in paths]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params)
  info = {"family": family, "pretrained_seeds": missing, "cached_seeds": [s for s in range(seeds) if s not in missing],
          "pretrain_s": time.perf_counter() - t0, "pretrain": dataclasses.asdict(pc),
          "cache": [os.path.basename(p) for p in paths]}
  return stacked, info


# ---------------------------------------------------------------------------------------------
# Learning rate by update size.

# Per-step relative update ||Δθ||/||θ|| that a real run's lr gives: AdamW's update is ~lr per
# coordinate, a 7B Qwen's weights have RMS ≈ 0.02, so ||Δθ||/||θ|| ≈ lr / 0.02.
REAL_WEIGHT_RMS = 0.02


def real_lr_equivalent(rel_update: float) -> float:
  """Returns the real-model AdamW lr whose per-step ||Δθ||/||θ|| is rel_update (≈ lr / 0.02)."""
  return rel_update * REAL_WEIGHT_RMS


def apollo_optimizer(lr: float) -> optax.GradientTransformation:
  """Returns the project's APOLLO-AdamW at this model's scale (rank 8: matrices are ≤ 88 wide)."""
  return engine.OPTIMIZERS["apollo"](lr)


def relative_update(params_a, params_b):
  """Returns ||a − b|| / ||b|| over the whole pytree."""
  diff = jax.tree.map(jnp.subtract, params_a, params_b)
  return optax.tree.norm(diff) / optax.tree.norm(params_b)


def finetune_seeds(config: ModelConfig, base_S, keys_S, pool: PreferenceBatch, *, lr: float,
                   steps: int, batch_size: int, gradient_mode: str = "full", objective: str = "orpo",
                   nll_on_prompt: bool = False, optimizer: str = "apollo", with_rel_update: bool = False,
                   active_steps: Optional[int] = None):
  """Returns (params [S, ...], loss [S, steps]): fine-tuning of every seed's base, vmapped.

  The project's train step on `sample_batch` draws (step i: fold_in(keys_S[s], i)) through the shared
  `sims.engine` program: only the model config, gradient mode and batch size select a compile; the
  lr, step count, optimizer (a key of OPTIMIZERS), objective, nll_on_prompt and pool are traced.
  with_rel_update: also return each step's ||Δθ_t|| / ||θ_t||, [S, steps]. active_steps: run only
  the first that many steps (loss and relative update 0 after them).
  """
  idx = engine.sample_indices(keys_S, pool.context_BxC.shape[-2], batch_size)
  settings = engine.arm(steps if active_steps is None else min(active_steps, steps), lr, optimizer=optimizer,
                        objective=objective, nll_on_prompt=nll_on_prompt)
  res = engine.finetune(config, base_S, pool, idx, settings, gradient_mode=gradient_mode)
  loss = res.loss[:, :steps]
  return (res.params, loss, res.rel_update(steps)) if with_rel_update else (res.params, loss)


# ---------------------------------------------------------------------------------------------
# Shared settings, so that simulations in one process share compiled functions and calibrations.

# Fine-tuning steps and batch of the standard arm (`finetune`): `sims.engine` compiles once per
# (config, gradient mode, batch size), so simulations at this batch share its programs.
FINETUNE_STEPS, QUICK_FINETUNE_STEPS, BATCH = 120, 40, 32
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = engine.OPTIMIZERS
_PROBES: dict = {}


def reference_pool(world: World) -> PreferenceBatch:
  """Returns the calibration pool: 1024 diverse behaviour preference pairs (fixed seed)."""
  return collate(examples("behaviour", 1024, np.random.default_rng(2024), world, preference=True))


PROBE_STEPS = 8  # steps whose mean relative update calibrates the lr


def lr_for(family: str, target: float, base_S, *, optimizer: str = "apollo", objective: str = "orpo",
           pc: PretrainConfig = PretrainConfig(), quick: bool = False, steps: Optional[int] = None) -> dict:
  """Returns the lr whose mean per-step ||Δθ||/||θ|| over the first PROBE_STEPS steps is `target`.

  The probe runs the arms' own fine-tuning (`finetune_seeds`: the shared engine program, nothing
  extra to compile) for min(PROBE_STEPS, steps) steps at a probe lr on the reference pool, once per
  (family, optimizer, objective, pretraining, probe steps, seeds), and averages the relative update
  over steps and seeds; other targets scale its lr linearly (Adam-type and SGD updates are ∝ lr).
  """
  n_steps = steps or (QUICK_FINETUNE_STEPS if quick else FINETUNE_STEPS)
  probe_steps = min(PROBE_STEPS, n_steps)
  n_seeds = int(jax.tree.leaves(base_S)[0].shape[0])
  key = (family, optimizer, objective, pc, probe_steps, n_seeds)

  def probe():
    probe_lr = 1e-1 if optimizer == "sgd" else 1e-3
    keys_S = jax.random.split(jax.random.PRNGKey(99), n_seeds)
    _, _, rel_SxT = finetune_seeds(model_config(family), base_S, keys_S, reference_pool(World.make(pc.world_seed)),
                                   lr=probe_lr, steps=probe_steps, batch_size=BATCH, objective=objective,
                                   optimizer=optimizer, with_rel_update=True)
    measured = float(np.mean(np.asarray(rel_SxT)))
    return {"probe_lr": probe_lr, "probe_rel_update": measured, "lr": probe_lr / measured,
            "probe_steps": probe_steps, "probe_seeds": n_seeds}

  probe = once(_PROBES, key, probe)
  return {**probe, "target_rel_update": target, "lr": probe["lr"] * target,
          "real_lr_equivalent": real_lr_equivalent(target), "optimizer": optimizer, "objective": objective}


def finetune(family: str, base_S, keys_S, pool: PreferenceBatch, *, lr: float, quick: bool,
             steps: Optional[int] = None, **kw):
  """`finetune_seeds` with the shared step count and batch (see FINETUNE_STEPS)."""
  steps = steps or (QUICK_FINETUNE_STEPS if quick else FINETUNE_STEPS)
  return finetune_seeds(model_config(family), base_S, keys_S, pool, lr=lr, steps=steps, batch_size=BATCH, **kw)
