"""A training session: the device state of a run and everything around its steps.

Both drivers, `dreamjax.train.loop.run` (launch.train) and `dreamjax.dream.cycle.run`
(launch.dream), open a `Session` and call the same five things:

    model = session.load_model(opts)                        # config, params, tokenizer
    s = Session(opts, model, run_config=..., resume_keys=..., total_steps=..., shapes=(C, R),
                eval_general=[...], eval_preference=[...])  # mesh, step, checkpoints, guard, resume
    s.step(examples)          # dispatches one train step; the previous step's metrics are read now
    s.evaluate()              # held-out figures → the guard's Decision (marks the checkpoint good)
    s.save(position)          # Orbax: train state + data position + run config
    s.rollback(what, d)       # back to the newest checkpoint that passed the guard
    s.close()

Non-blocking steps (nanodo's pattern): `step` dispatches step k and only then pulls step k − 1's
metrics to the host for the log, the progress bar and the non-finite guard. The train step
already keeps the old parameters on a non-finite step (`skip_nonfinite`), so the guard acting one
step late changes no parameter: it can only abort (and roll back to a checkpoint) a step later.
`evaluate`, `save` and `flush` wait for the newest step. The step's host counter replaces
`int(state.step)`, which would wait every step.

The run folder (design.md) holds config.json (the run config, written once), checkpoints/,
base_model/ (the params before training: drift, rollback, a DPO reference), tb/ and
monitor.jsonl; drivers add their own files (summary.json, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dreamjax import model as M
from dreamjax import objectives as obj
from dreamjax.data import builtin
from dreamjax.data import tokenize as tok_lib
from dreamjax.model import config as model_config_lib
from dreamjax.model import hf
from dreamjax.train import batch as batch_lib
from dreamjax.train import checkpoint as ckpt_lib
from dreamjax.train import evaluation
from dreamjax.train import guard as guard_lib
from dreamjax.train import log as log_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import options as options_lib
from dreamjax.train import step as step_lib

RunError = options_lib.RunError


# ---------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass
class Model:
  """A loaded model: its config (with the run's implementation options), params and tokenizer."""

  config: M.ModelConfig
  params: Any
  tokenizer: tok_lib.TextTokenizer
  is_preset: bool  # a tiny preset: random init, built-in tokenizer


def load_model(opts: options_lib.TrainOptions, mesh: Optional[jax.sharding.Mesh] = None) -> Model:
  """Returns the model of --model: a local HF folder, or a tiny preset (random init from --seed).

  With a mesh the parameters go straight into their shardings (a folder's tensor by tensor, a
  preset's init compiled with its output shardings), never whole onto one device: what a model
  larger than one device, or a multi-process run, needs. Without one, onto the default device.
  """
  if opts.model in model_config_lib.PRESETS:
    config = M.ModelConfig.preset(opts.model)
    init = lambda key: M.init_params(config, key)
    key = jax.random.PRNGKey(opts.seed)
    if mesh is None:
      params = init(key)
    else:
      shardings = mesh_lib.tree_shardings(jax.eval_shape(init, key), mesh)
      params = jax.jit(init, out_shardings=shardings)(key)
    tokenizer = tok_lib.TextTokenizer.from_folder(builtin.TOKENIZER)
    is_preset = True
  else:
    if not os.path.isdir(opts.model):
      raise RunError(f"--model: {opts.model!r} is neither a local model folder nor a preset "
                     f"({', '.join(sorted(model_config_lib.PRESETS))}); models are read from local folders only")
    config = M.ModelConfig.from_hf(opts.model)
    tokenizer = tok_lib.TextTokenizer.from_folder(opts.model)  # a bad tokenizer fails before the weights load
    params = hf.load_params(opts.model, config, place=None if mesh is None else mesh_lib.param_placer(mesh))
    is_preset = False
  config = config.replace(attention_impl=opts.attention_impl, prefill_chunk=opts.prefill_chunk)
  check_vocab(config, tokenizer)
  return Model(config, params, tokenizer, is_preset)


def check_vocab(config: M.ModelConfig, tokenizer: tok_lib.TextTokenizer) -> None:
  """RunError when the tokenizer has ids past the model's embedding."""
  if tokenizer.vocab_size > config.vocab_size:
    raise RunError(f"tokenizer/model vocab mismatch: {tokenizer.source}/tokenizer.json has {tokenizer.vocab_size} "
                   f"ids but the model's vocab_size is {config.vocab_size}; ids past it have no embedding")


def prepare_run_dir(run_dir: str) -> None:
  """Creates the run folder; RunError when it cannot be written."""
  try:
    os.makedirs(run_dir, exist_ok=True)
    probe = os.path.join(run_dir, f".write_test.{jax.process_index()}")  # one per process: no race
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise RunError(f"--run_dir: {run_dir!r} is not writable: {e.strerror or e}") from None


def write_json_once(path: str, obj_) -> None:
  """Writes `obj_` to `path` unless the file exists (atomically: a crash leaves no partial file)."""
  if not os.path.exists(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj_, f, indent=1)
    os.replace(tmp, path)


def make_mesh(opts: options_lib.TrainOptions) -> jax.sharding.Mesh:
  """Returns the --mesh mesh; RunError when the devices or the batch do not fit it."""
  shape = mesh_lib.parse_mesh_flag(opts.mesh)
  n_mesh = int(np.prod(shape))  # a mesh without -1 may use only the first devices
  try:
    mesh = mesh_lib.make_mesh(shape, jax.devices()[:n_mesh] if -1 not in shape else None)
  except ValueError as e:
    raise RunError(f"--mesh {opts.mesh}: {e}") from None
  if (opts.batch_size // opts.grad_accum) % mesh.devices.size:
    raise RunError(f"--batch_size {opts.batch_size} / --grad_accum {opts.grad_accum} is not divisible by the "
                   f"{mesh.devices.size} devices of --mesh {opts.mesh}")
  return mesh


_STEPS: dict = {}


def train_step(config: M.ModelConfig, opts: options_lib.TrainOptions, lr: float, total_steps: int, mesh):
  """Returns (optimizer, schedule, jitted step, jitted state init) for these settings, reused by
  later sessions of the process with the same ones (a resumed run, the dream cycle's repeated
  opens, tests), so each compiles once per process. The init copies the params into a fresh
  TrainState with every leaf in its sharding (`mesh_lib.tree_shardings`)."""
  key = (config, lr, None if opts.schedule == "constant" else total_steps, mesh,
         tuple(getattr(opts, k) for k in options_lib.STEP_OPTIONS))
  if key not in _STEPS:
    optimizer, schedule = options_lib.make_optimizer(opts, lr, total_steps)
    step_fn = step_lib.make_train_step(
        config, opts.objective, optimizer, opts.gradient_mode, mesh=mesh, objective_kwargs={"beta": opts.beta},
        remat=opts.remat_policy if opts.remat else False, compute_dtype=jnp.bfloat16 if opts.bf16 else None,
        grad_accum=opts.grad_accum, skip_nonfinite=True, grad_stats=True, dropout=opts.dropout)
    init = lambda p: step_lib.init_train_state(jax.tree.map(jnp.copy, p), optimizer, seed=opts.seed)
    cache: dict = {}

    def init_state(params):  # compiled once per params structure
      k = jax.tree.structure(params)
      if k not in cache:
        cache[k] = jax.jit(init, out_shardings=mesh_lib.tree_shardings(jax.eval_shape(init, params), mesh))
      return cache[k](params)

    _STEPS.clear()  # one entry: a process rarely alternates between settings
    _STEPS[key] = (optimizer, schedule, step_fn, init_state)
  return _STEPS[key]


def _host(x) -> float:
  return float(np.asarray(jax.device_get(x)))


@dataclasses.dataclass
class _Pending:
  step: int
  metrics: Mapping[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# The session.


class Session:
  """One run's train state, step, checkpoints, guard, evaluator and logs (see module docstring).

  Args:
    opts: the training options.
    model: `load_model(opts)`.
    run_config: what RUN/config.json and every checkpoint record (the driver's config, JSON).
    resume_keys: the run_config keys that must match to resume.
    total_steps: the run's planned steps (the lr schedule's length and the progress bar's).
    shapes: static (context_len, response_len) of every batch.
    eval_general, eval_preference: held-out TokenizedExamples for the evaluator (general text for
      perplexity; without any, the held-out preferences' chosen responses serve).
    save_every: checkpoint steps that are multiples of this (and any `save(force=True)`).
    grad_log_every: log the per-layer gradient norms every this many steps.
    mesh: the --mesh mesh (`make_mesh`; made here when None).
    eval_metrics: also evaluate the training objective's metrics on eval_preference
      (`evaluation.Evaluator`'s objective_metrics: eval_data/loss, eval_data/rewards/..., ...).
  """

  def __init__(self, opts: options_lib.TrainOptions, model: Model, *, run_config: dict, resume_keys: Sequence[str],
               total_steps: int, shapes: tuple[int, int], eval_general: Sequence = (), eval_preference: Sequence = (),
               save_every: int = 100, grad_log_every: int = 1, mesh: Optional[jax.sharding.Mesh] = None,
               eval_metrics: bool = False):
    self.opts, self.model, self.run_config = opts, model, run_config
    self.shapes, self.total_steps, self.grad_log_every = shapes, total_steps, grad_log_every
    self.objective = obj.get(opts.objective)
    self.pad_id = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
    self.lr = options_lib.learning_rate(opts, model.is_preset)
    self.mesh = mesh if mesh is not None else make_mesh(opts)
    self.optimizer, self.schedule, self._step_fn, init_state = train_step(model.config, opts, self.lr, total_steps,
                                                                          self.mesh)
    params = jax.device_put(model.params, mesh_lib.tree_shardings(model.params, self.mesh))  # a no-op if placed
    # The step donates its state: the base params (drift, rollback, DPO reference) are a copy.
    self.state = init_state(params)
    config_path = os.path.join(opts.run_dir, "config.json")
    if opts.resume and os.path.exists(config_path):  # refuse a changed run before touching anything in it
      self._check_config(model_config_lib.read_json_object(config_path, RunError), config_path, resume_keys)
    if mesh_lib.is_main_process():
      write_json_once(config_path, run_config)

    self.ckpt = ckpt_lib.Checkpointer(os.path.join(opts.run_dir, "checkpoints"), keep=opts.keep,
                                      save_every=save_every)
    self.guard = guard_lib.Guard(opts.run_dir, options_lib.guard_config(opts, model.is_preset))
    if self.ckpt.has_base():
      self.base_params = self.ckpt.restore_base(params, self.mesh)
    else:
      self.ckpt.save_base(params)
      self.base_params = params
    self.position: Optional[dict] = None  # the data position of the restored checkpoint
    self.start = 0
    if opts.resume and self.ckpt.latest_step() is not None:
      self.state, self.position, saved_config, self.start = self.ckpt.restore(abstract_state=self.state,
                                                                              mesh=self.mesh)
      self._check_config(saved_config, opts.run_dir, resume_keys)
      self.guard.restore(self.start)
      if self.guard.last_passed_step is not None:
        self.ckpt.mark_good(self.guard.last_passed_step)
      logging.info("resumed %s at step %d", opts.run_dir, self.start)
    elif not opts.resume and self.ckpt.latest_step() is not None:
      raise RunError(f"--run_dir {opts.run_dir!r} already holds checkpoints (steps {self.ckpt.all_steps()}) and "
                     "--noresume was given; choose a new run folder (nothing there is overwritten)")
    self.step_count = self.start  # host counter of state.step
    self.ref_params = self.base_params if self.objective.needs_reference else None
    self._eval_general = list(eval_general)
    self._eval_preference = list(eval_preference)
    self._eval_metrics = eval_metrics
    self._evaluator = None  # built at the first evaluate (it evaluates the base model once)
    self.logger = log_lib.Logger(opts.run_dir, total_steps)
    self.losses: list[tuple[int, float]] = []  # (step, loss) of every finite step this session
    self.last_metrics: dict[str, float] = {}
    self.last_figures: dict = {}
    self._pending: Optional[_Pending] = None
    self._t_last = time.time()

  def _check_config(self, saved: Mapping, where: str, keys: Sequence[str]) -> None:
    try:
      ckpt_lib.check_resume_config(saved, self.run_config, keys=keys)
    except ckpt_lib.ResumeConfigError as e:
      raise RunError(f"{where}: {e}") from None

  # -------------------------------------------------------------------------------------------
  # Steps.

  def collate(self, examples: Sequence[batch_lib.TokenizedExample]) -> batch_lib.PreferenceBatch:
    """Returns the examples as a batch of global arrays sharded over the mesh's batch axes (every
    process collates the same examples and fills its own devices' rows)."""
    return mesh_lib.put_batch(batch_lib.collate(examples, *self.shapes, pad_id=self.pad_id), self.mesh)

  def step(self, examples: Sequence[batch_lib.TokenizedExample]) -> Optional[guard_lib.Decision]:
    """Dispatches one train step on `examples`; then reads the previous step's metrics (logs them)
    and returns the guard's decision about that step when it was non-finite (else None)."""
    batch = self.collate(examples)
    if self.ref_params is not None:
      self.state, metrics = self._step_fn(self.state, batch, self.ref_params)
    else:
      self.state, metrics = self._step_fn(self.state, batch)
    self.step_count += 1
    decision = self._read_pending()
    self._pending = _Pending(self.step_count, metrics)
    return decision

  def flush(self) -> Optional[guard_lib.Decision]:
    """Waits for the newest step and reads its metrics; returns the guard's decision when it was
    non-finite (else None)."""
    return self._read_pending()

  def _read_pending(self) -> Optional[guard_lib.Decision]:
    p, self._pending = self._pending, None
    if p is None:
      return None
    loss, gnorm = _host(p.metrics["loss"]), _host(p.metrics["grad_norm"])
    now = time.time()
    step_time, self._t_last = now - self._t_last, now
    log_grads = p.step % self.grad_log_every == 0
    scalars = {k: v for k, v in p.metrics.items() if log_grads or not k.startswith("grad/")}
    self.logger.log(p.step, scalars, lr=float(self.schedule(p.step - 1)), step_time=step_time,
                    tokens=_host(p.metrics["tokens"]))
    self.logger.progress(p.step, loss=loss)
    self.last_metrics = {k: _host(v) for k, v in p.metrics.items() if not k.startswith("grad/")}
    if np.isfinite(loss + gnorm):
      self.losses.append((p.step, loss))
      return None
    return self.guard.skip_nonfinite(p.step, loss, gnorm)

  # -------------------------------------------------------------------------------------------
  # Evaluation, checkpoints, rollback.

  @property
  def evaluator(self) -> evaluation.Evaluator:
    """The held-out evaluator; its batches (any size) are replicated on every device."""
    if self._evaluator is None:
      collate = lambda exs: mesh_lib.put_replicated(batch_lib.collate(exs, *self.shapes, pad_id=self.pad_id),
                                                    self.mesh)
      bs = self.opts.batch_size
      general = [collate(self._eval_general[i:i + bs]) for i in range(0, len(self._eval_general), bs)]
      pref = [collate(self._eval_preference[i:i + bs]) for i in range(0, len(self._eval_preference), bs)]
      if not general:  # no general data: perplexity on the held-out chosen responses
        general = [collate([batch_lib.TokenizedExample(e.context, e.chosen) for e in self._eval_preference])]
      metrics_fn = None
      if self._eval_metrics and pref:
        kw = dict(config=self.model.config, objective=self.objective, gradient_mode=self.opts.gradient_mode,
                  objective_kwargs={"beta": self.opts.beta})
        loss = jax.jit(lambda p, b, ref: step_lib.batch_loss(p, b, ref_params=ref, **kw)[1])
        metrics_fn = lambda params, batch: loss(params, batch, self.ref_params)
      self._evaluator = evaluation.Evaluator(self.base_params, self.model.config, general, pref,
                                             objective_metrics=metrics_fn)
    return self._evaluator

  def evaluate(self) -> guard_lib.Decision:
    """Evaluates the newest params (after reading the pending step) and returns the guard's decision;
    when that step was non-finite (skipped), the guard's decision about it instead."""
    decision = self.flush()
    if decision is not None:  # the newest step was non-finite (skipped): no figures for it
      return decision
    self.last_figures = self.evaluator.figures(self.state.params)
    self.logger.log(self.step_count, evaluation.tb_sections(self.last_figures), prefix="")  # eval/, monitor/
    decision = self.guard.decide(self.step_count, self.last_figures)
    if decision.passed:
      self.ckpt.mark_good(self.step_count)
    return decision

  def save(self, position: Mapping[str, int], *, force: bool = False) -> bool:
    """Checkpoints the state at the current step with the data position (a multiple of save_every,
    or force); returns whether a checkpoint was written."""
    return self.ckpt.save(self.step_count, self.state, dict(position), self.run_config, force=force)

  def wait(self) -> None:
    """Waits for pending checkpoint writes."""
    self.ckpt.wait()

  def rollback(self, what: str, decision: guard_lib.Decision) -> str:
    """Rolls the checkpoints back to the newest one that passed the guard; returns the run status."""
    status = f"{what}: {'; '.join(decision.reasons)}"
    target = self.guard.rollback_step(self.ckpt.all_steps())
    if target is not None:
      self.ckpt.rollback(target, abstract_state=self.state, mesh=self.mesh)
      status += f"; rolled back to checkpoint step {target}"
    else:
      status += "; no checkpoint passed the guard, nothing to roll back to"
    logging.error(status)
    return status

  def close(self) -> None:
    """Reads the last step's metrics, finishes checkpoint writes and closes the logs."""
    self.flush()
    self.ckpt.wait()
    self.ckpt.close()
    self.logger.close()

  def paths(self) -> dict:
    run_dir = os.path.abspath(self.opts.run_dir)
    return {"run_dir": run_dir, "checkpoints": os.path.abspath(str(self.ckpt.directory)),
            "tensorboard": os.path.join(run_dir, "tb"), "monitor": os.path.abspath(self.guard.path)}
