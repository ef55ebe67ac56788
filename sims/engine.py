"""The simulations' fine-tuning program: up to T_CAP project train steps from a train state.

One compiled program per (model config, gradient mode, batch size, dropout rate): shapes and graph
structure. Everything else an arm changes is a traced argument, so arms and simulations share it:

  per seed (vmapped):  the train state (`State`: params, every optimizer's state, step, rng, last
                       gradient), the example pool (padded to P_CAP rows) with the reference model's
                       log-probs of its rows (DPO / DPOP; computed once per call, `reference_logprobs`)
                       and the batch index table [T_CAP, B]: which pool rows step t trains on (the
                       batch composition; `sample_indices` draws `world.sample_batch`'s rows);
  per call (`Arm`):    the number of steps (a `while_loop` trip count: steps after it are not
                       computed), the lr and its linear warm-up, the optimizer (a `lax.switch` over
                       OPTIMIZERS), the objective (a `lax.switch` over OBJECTIVES) and whether ORPO's
                       NLL also covers the prompt tokens (full mode).

The per-call settings are the same for every seed (unbatched under the seed vmap), so the switches
stay real branches: a call computes only its own optimizer and objective. A call continues from the
state it is given: rounds, chunks and restarts (`init` from the current params: a fresh optimizer)
are successive calls.

A step is the project's train step (`dreamjax.train.step`): the policy log-probs in the gradient
mode, `loss_from_logprobs` of the objective, the optimizer update. What it computes beyond
`make_train_step` is either unused (full mode always scores the prompt tokens; their NLL enters the
loss only with nll_on_prompt; SFT ignores the rejected responses it scores) or a per-step figure
(per-layer gradient norms and their cosine with the previous step's gradient). It agrees with
`make_train_step` to float32 round-off, not bit for bit: with the optimizer switch XLA fuses the
gradient's computation differently (with one optimizer the params were bit-identical; the per-step
loss and norms differed in the last bit either way).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamjax import objectives as obj
from dreamjax import optim
from dreamjax.model import ModelConfig, layout
from dreamjax.train import step as step_lib
from dreamjax.train.batch import PreferenceBatch
from dreamjax.train.step import TrainState

T_CAP = 256  # most steps one call runs; the per-step figures have this length
P_CAP = 2048  # pool rows: pools are padded to this (an index table stays below its pool's own size)

OPTIMIZERS = {
    "apollo": lambda lr: optim.apollo(lr, rank=8, update_proj_gap=50),  # the project's APOLLO at this scale
    "apollo_mini": lambda lr: optim.apollo_mini(lr),
    "adamw": lambda lr: optax.adamw(lr, weight_decay=0.0),
    "sgd": lambda lr: optax.sgd(lr),
}
OBJECTIVES = ("orpo", "sft", "dpo", "dpop")
_USES = {"orpo": ("chosen", "rejected", "nll"), "sft": ("chosen",),  # the log-probs each objective reads
         "dpo": ("chosen", "rejected", "ref_chosen", "ref_rejected"),
         "dpop": ("chosen", "rejected", "ref_chosen", "ref_rejected")}


class Arm(NamedTuple):
  """The traced settings of one call, the same for all its seeds (build with `arm`)."""

  steps: jax.Array  # int32: steps to run, 0 ≤ steps ≤ T_CAP
  lr: jax.Array  # float32: the peak learning rate
  warmup: jax.Array  # float32: lr(count) = lr · min(1, (count + 1) / warmup); 1 = constant
  optimizer: jax.Array  # int32: index into OPTIMIZERS
  objective: jax.Array  # int32: index into OBJECTIVES
  nll_on_prompt: jax.Array  # bool: ORPO's NLL also on the prompt tokens (TRL's default; full mode only)


def arm(steps: int, lr, *, optimizer: str = "apollo", objective: str = "orpo", nll_on_prompt: bool = False,
        warmup: float = 1.0) -> Arm:
  """Returns the Arm of these settings (optimizer and objective named as in OPTIMIZERS and OBJECTIVES)."""
  if not 0 <= steps <= T_CAP:
    raise ValueError(f"steps {steps} outside [0, T_CAP = {T_CAP}]")
  return Arm(jnp.int32(steps), jnp.float32(lr), jnp.float32(warmup), jnp.int32(list(OPTIMIZERS).index(optimizer)),
             jnp.int32(OBJECTIVES.index(objective)), jnp.bool_(nll_on_prompt))


class State(NamedTuple):
  """A seed's train state between calls."""

  train: TrainState  # params, every optimizer's state (a tuple in OPTIMIZERS order), step, rng
  grad: Any  # the last step's gradient (zeros before the first step)


class Result(NamedTuple):
  """What `run` returns: the states and per-step figures [S, T_CAP, ...] (numpy; 0 after the last step)."""

  state: State
  loss: np.ndarray  # the batch loss
  update_norm: np.ndarray  # ||Δθ_t||
  param_norm: np.ndarray  # ||θ_t|| before step t
  grad_norm: np.ndarray  # [S, T_CAP, L]: per-layer gradient norm
  grad_cos: np.ndarray  # [S, T_CAP, L]: per-layer cosine of the gradient with the previous step's

  @property
  def params(self):
    return self.state.train.params

  def rel_update(self, steps: Optional[int] = None, fill=0.0) -> np.ndarray:
    """Returns ||Δθ_t|| / ||θ_t|| [S, steps] (`fill` where no step ran)."""
    ran = self.param_norm > 0
    rel = np.where(ran, self.update_norm / np.where(ran, self.param_norm, 1), np.float32(fill))
    return rel if steps is None else rel[:, :steps]


def _optimizers(settings: Arm) -> list[optax.GradientTransformation]:
  """Returns every optimizer with the arm's lr schedule (lr · 1.0 = lr exactly without a warm-up)."""
  schedule = lambda count: settings.lr * jnp.minimum(1.0, (count + 1) / settings.warmup)
  return [make(schedule) for make in OPTIMIZERS.values()]


@functools.cache
def _init_fn():
  def init_state(params, rng):
    opts = _optimizers(arm(0, 1.0))  # the state layout does not depend on the lr
    train = TrainState(params, tuple(o.init(params) for o in opts), jnp.zeros((), jnp.int32), rng)
    return State(train, jax.tree.map(jnp.zeros_like, params))
  return jax.jit(jax.vmap(init_state))


def init(params_S, rng_S=None) -> State:
  """Returns fresh states [S] (every optimizer's initial state, step 0) for params with a seed axis.

  rng_S: per-seed PRNG keys [S, 2] for the dropout masks (default PRNGKey(0), as `init_train_state`).
  """
  s = jax.tree.leaves(params_S)[0].shape[0]
  if rng_S is None:
    rng_S = jnp.broadcast_to(jax.random.PRNGKey(0), (s, 2))
  return _init_fn()(params_S, rng_S)


def layer_stats(a, b, config: ModelConfig):
  """Returns ([L] ||a_l||, [L] cos(a_l, b_l)): per decoder layer l, all leaves of the layer as one vector."""
  norms, cosines = [], []
  for la, lb in zip(layout.unstack(a, config), layout.unstack(b, config)):
    dot = sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(la), jax.tree.leaves(lb)))
    na = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(la)))
    nb = jnp.sqrt(sum(jnp.sum(y * y) for y in jax.tree.leaves(lb)))
    norms.append(na)
    cosines.append(dot / jnp.maximum(na * nb, 1e-30))
  return jnp.stack(norms), jnp.stack(cosines)


def _loss(params, batch: PreferenceBatch, ref_lp, settings: Arm, *, config: ModelConfig, gradient_mode: str,
          dropout):
  """Returns the batch loss of the arm's objective (`step_lib.loss_from_logprobs`)."""
  if gradient_mode == "full":
    chosen, rejected, both = step_lib.response_logprobs_full(params, batch, config, with_prompt=True, dropout=dropout)
    nll = jax.tree.map(lambda a, b: jnp.where(settings.nll_on_prompt, a, b), both, chosen)
    lp = {"chosen": chosen, "rejected": rejected, "nll": nll}
  else:
    lp = dict(zip(("chosen", "rejected"), step_lib.response_logprobs_frozen(params, batch, config, dropout=dropout)))
  lp["ref_chosen"], lp["ref_rejected"] = ref_lp

  def branch(name):
    return lambda lp: step_lib.loss_from_logprobs({k: lp[k] for k in _USES[name] if k in lp}, batch.is_preference_B,
                                                  objective=name)[0]

  return jax.lax.switch(settings.objective, [branch(name) for name in OBJECTIVES], lp)


_LOCK = threading.Lock()  # simulations run in threads (harness jobs): one jitted function per program


@functools.cache
def _run_fn(config: ModelConfig, gradient_mode: str, batch_size: int, dropout: float):
  """Returns jit(vmap over seeds of `train_steps`); the Arm is unbatched."""
  if gradient_mode not in step_lib.GRADIENT_MODES:
    raise ValueError(f"gradient_mode must be one of {step_lib.GRADIENT_MODES}, got {gradient_mode!r}")
  grad_fn = jax.value_and_grad(functools.partial(_loss, config=config, gradient_mode=gradient_mode))

  def train_steps(state: State, ref_lp, pool: PreferenceBatch, idx_TxB, settings: Arm):
    opts = _optimizers(settings)

    def update(i, grads, opt_state, params):  # optimizer i's update; the others' states pass through
      updates, new = opts[i].update(grads, opt_state[i], params)
      return updates, opt_state[:i] + (new,) + opt_state[i + 1:]

    def body(carry):
      t, (train, prev), out = carry
      batch, batch_ref_lp = jax.tree.map(lambda x: x[idx_TxB[t]], (pool, ref_lp))
      drop = (dropout, jax.random.fold_in(train.rng, train.step)) if dropout else (0.0, None)
      norm = optax.tree.norm(train.params)
      loss, grads = grad_fn(train.params, batch, batch_ref_lp, settings, dropout=drop)
      updates, opt_state = jax.lax.switch(settings.optimizer, [functools.partial(update, i) for i in range(len(opts))],
                                          grads, train.opt_state, train.params)
      params = optax.apply_updates(train.params, updates)
      grad_norm, grad_cos = layer_stats(grads, prev, config)
      row = {"loss": loss, "update_norm": optax.tree.norm(updates), "param_norm": norm, "grad_norm": grad_norm,
             "grad_cos": grad_cos}
      out = {k: out[k].at[t].set(v) for k, v in row.items()}
      return t + 1, State(TrainState(params, opt_state, train.step + 1, train.rng), grads), out

    scalar, per_layer = jnp.zeros((T_CAP,), jnp.float32), jnp.zeros((T_CAP, config.num_layers), jnp.float32)
    out = {"loss": scalar, "update_norm": scalar, "param_norm": scalar, "grad_norm": per_layer, "grad_cos": per_layer}
    _, state, out = jax.lax.while_loop(lambda c: c[0] < settings.steps, body, (jnp.int32(0), state, out))
    return state, out

  return jax.jit(jax.vmap(train_steps, in_axes=(0, 0, 0, 0, None)))


def per_seed(pool: PreferenceBatch, seeds: int) -> PreferenceBatch:
  """Returns the pool with a leading seed axis [S, N, ...] (broadcast on the host if it has none)."""
  if pool.context_BxC.ndim == 3:
    return pool
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None], (seeds,) + x.shape), pool)


def pad_pool(rows, seeds: int):
  """Returns per-row data (a pool, or `reference_logprobs`) padded to [S, P_CAP, ...] on the host (an XLA
  pad would compile once per pool shape); a pool without a seed axis is broadcast to every seed."""
  if isinstance(rows, PreferenceBatch):
    rows = per_seed(rows, seeds)
  n = jax.tree.leaves(rows)[0].shape[1]
  if n > P_CAP:
    raise ValueError(f"a pool of {n} rows exceeds P_CAP = {P_CAP}")
  return jax.tree.map(lambda x: np.pad(np.asarray(x), [(0, 0), (0, P_CAP - n)] + [(0, 0)] * (np.ndim(x) - 2)), rows)


@functools.cache
def _reference_fn(config: ModelConfig):
  def reference_logprobs(ref, pool):  # the frozen reference model's log-probs (as `example_logprobs`)
    return step_lib.response_logprobs(jax.lax.stop_gradient(ref), pool, config, "frozen")
  return jax.jit(jax.vmap(reference_logprobs))


def reference_logprobs(config: ModelConfig, ref_S, pool: PreferenceBatch):
  """Returns (chosen, rejected) `SeqLogProbs` [S, N] of every pool row under each seed's reference model
  (frozen mode, no dropout): DPO / DPOP's reference, computed once for all the steps of a call."""
  seeds = jax.tree.leaves(ref_S)[0].shape[0]
  return _reference_fn(config)(ref_S, per_seed(pool, seeds))


def pad_steps(idx_SxTxB) -> np.ndarray:
  """Returns an index table [S, T, B] padded with row 0 to [S, T_CAP, B] (int32, on the host)."""
  idx = np.asarray(idx_SxTxB, np.int32)
  if idx.shape[1] > T_CAP:
    raise ValueError(f"an index table of {idx.shape[1]} steps exceeds T_CAP = {T_CAP}")
  return np.pad(idx, [(0, 0), (0, T_CAP - idx.shape[1]), (0, 0)])


@functools.cache
def _indices_fn(batch_size: int):
  def draw_indices(key, start, n):
    draw = lambda i: jax.random.randint(jax.random.fold_in(key, start + i), (batch_size,), 0, n)
    return jax.vmap(draw)(jnp.arange(T_CAP))
  return jax.jit(jax.vmap(draw_indices, in_axes=(0, None, 0)))


def sample_indices(keys_S, n, batch_size: int, start: int = 0) -> np.ndarray:
  """Returns [S, T_CAP, B] (on the host): step i draws B rows of [0, n) uniformly with key fold_in(key_s, start + i).

  These are the rows `world.sample_batch(pool, fold_in(key, start + i), B)` draws from a pool of n
  rows; n may differ per seed ([S]).
  """
  n_S = np.broadcast_to(np.asarray(n, np.int32), (keys_S.shape[0],))
  return np.asarray(_indices_fn(int(batch_size))(keys_S, np.int32(start), n_S))


def program(config: ModelConfig, state: State, pool: PreferenceBatch, idx_SxTxB, settings: Arm, *,
            gradient_mode: str = "full", ref_S=None, ref_lp=None, dropout: float = 0.0):
  """Returns (the jitted program, its arguments) of `run` with these arguments (e.g. to lower and time it)."""
  if gradient_mode != "full" and bool(settings.nll_on_prompt):
    raise ValueError("nll_on_prompt needs gradient_mode='full' (a frozen context takes no gradient)")
  seeds = jax.tree.leaves(state.train.params)[0].shape[0]
  idx = pad_steps(idx_SxTxB)
  with _LOCK:
    fn = _run_fn(config, gradient_mode, int(idx.shape[2]), float(dropout))
  if ref_lp is None:
    if OBJECTIVES[int(settings.objective)] in ("dpo", "dpop"):
      ref_lp = reference_logprobs(config, state.train.params if ref_S is None else ref_S, pool)
    else:  # unused: zeros
      zero = np.zeros((seeds, P_CAP), np.float32)
      ref_lp = (obj.SeqLogProbs(zero, zero, zero),) * 2
  return fn, (state, pad_pool(ref_lp, seeds), pad_pool(pool, seeds), idx, settings)


def run(config: ModelConfig, state: State, pool: PreferenceBatch, idx_SxTxB, settings: Arm, **kw) -> Result:
  """Returns the Result of settings.steps train steps of every seed from `state` (module docstring).

  Args:
    state: states with a seed axis [S] (`init`, or a previous call's).
    pool: the examples, [N, ...] shared by the seeds or [S, N, ...] per seed (N ≤ P_CAP).
    idx_SxTxB: step t of seed s trains on pool rows idx[s, t] (T ≤ T_CAP); its B is the batch size.
    settings: the call's traced settings (`arm`).
    gradient_mode: 'full' (default) or 'frozen'.
    ref_S: the frozen reference model of DPO / DPOP (default: the params of `state`); or
    ref_lp: its log-probs of the pool rows (`reference_logprobs`), when several calls share them.
    dropout: the train step's residual dropout rate (a separate compile when non-zero).
  """
  fn, args = program(config, state, pool, idx_SxTxB, settings, **kw)
  new, out = fn(*args)
  return Result(new, **{k: np.asarray(v) for k, v in out.items()})


def finetune(config: ModelConfig, params_S, pool: PreferenceBatch, idx_SxTxB, settings: Arm, **kw) -> Result:
  """`run` from fresh states of params_S (`init`)."""
  return run(config, init(params_S), pool, idx_SxTxB, settings, **kw)


# Host-side (numpy) stacking and slicing of pytrees: the eager XLA ops would compile a small program
# per leaf shape (and per count), hundreds over a suite.


def take(tree, i):
  """Returns tree[i] leafwise (numpy)."""
  return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def stack(trees, axis: int = 0):
  """Returns the pytrees stacked leafwise on a new axis (numpy)."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs], axis), *trees)
