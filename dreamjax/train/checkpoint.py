"""Orbax checkpoints of a run: train state, data position and run config per step; the base model.

Layout under `directory` (the run's `RUN/checkpoints/`):

    <step>/state           TrainState (params, opt_state incl. APOLLO keys, step, rng): StandardSave
    <step>/data_position   the mixer position, a dict of ints: JsonSave
    <step>/run_config      the run config, a JSON dict: JsonSave
    corrupt/<step>         steps found unreadable on restore, moved aside (never deleted)
    rolled_back/<step>     steps newer than a rollback target, moved aside (never deleted)

and beside it, `RUN/base_model/`: the base model params, written once (drift, rollback, the DPO
reference): StandardSave.

`Checkpointer` wraps `ocp.CheckpointManager` with a save-decision policy (every `save_every` steps,
or at a multi-host preemption sync point) and a preservation policy (the newest `keep` steps, plus
the newest step marked good by the monitor, so a rollback target is never deleted). Saves are
asynchronous: `save` returns once the arrays are on the host (so the caller may donate the state
to the next step); errors of the background write surface at the next `save`, `wait` or `close`.

Restores go onto the shardings of an abstract target (`abstract_like`), so a state saved on an
8-device mesh restores on 1 device and the other way round. A corrupt or partial newest step is
skipped with a warning and the previous one restored. A failed save (disk full) leaves the
previous steps intact and raises `CheckpointSaveError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh, SingleDeviceSharding

from dreamjax.train.mesh import tree_shardings

STATE, DATA, CONFIG = "state", "data_position", "run_config"
BASE_DIR, CORRUPT_DIR, ROLLED_BACK_DIR = "base_model", "corrupt", "rolled_back"
# Run-config fields that must not change on resume (absent from both configs: not checked).
RESUME_MUST_MATCH = ("model", "optimizer", "objective", "gradient_mode", "seed")

_policies = ocp.checkpoint_managers
_COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # written by Orbax last, before the rename
_TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX  # an unfinished save's directory


class CheckpointError(RuntimeError):
  """No checkpoint can be restored, or the one asked for is unreadable or does not exist."""


class CheckpointSaveError(CheckpointError):
  """A save failed (e.g. disk full); the steps saved before it are intact."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's arrays do not match the target state (names, shapes or dtypes)."""


class ResumeConfigError(ValueError):
  """The run config of a resumed run differs from the checkpoint's on a field that must match."""


def is_unfinished(name: str) -> bool:
  """Whether a folder name is an unfinished save's (Orbax's `<name>.orbax-checkpoint-tmp-<time>`,
  or another `*-tmp` / `*.tmp` writer's), never a checkpoint."""
  return _TMP_SUFFIX in name or bool(re.search(r"[-.]tmp(-\d+)?$", name))


class _Unreadable(Exception):
  """Internal: one step cannot be read (corrupt, partial or uncommitted)."""


# ---------------------------------------------------------------------------------------------
# Abstract targets: shapes, dtypes and the shardings to restore onto.


def abstract_like(tree, mesh: Optional[Mesh] = None):
  """Returns ShapeDtypeStructs of `tree`'s arrays carrying the shardings to restore onto.

  With a mesh: the `tree_shardings` table of that mesh. Without: each leaf's own sharding when it
  has one (a jax.Array or a sharded ShapeDtypeStruct), else device 0. `tree` may be a concrete
  state or `jax.eval_shape(...)` of one.
  """
  shardings = tree_shardings(tree, mesh) if mesh is not None else None

  def one(leaf, sharding=None):
    if sharding is None:
      sharding = getattr(leaf, "sharding", None) or SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)

  if shardings is None:
    return jax.tree.map(one, tree)
  return jax.tree.map(one, tree, shardings)


def _check_target(meta_tree, target, where: str) -> None:
  """Raises CheckpointMismatchError when the saved arrays differ from the target's in name/shape/dtype."""
  saved = {m.name: (tuple(m.shape), np.dtype(m.dtype)) for m in jax.tree.leaves(meta_tree)
           if hasattr(m, "name")}
  wanted, names = {}, set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = ".".join(ocp.tree.str_keypath(path))  # Orbax's name of the array, e.g. 'params.embed'
    names.add(name)
    if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys: Orbax checks them
      wanted[name] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  problems = []
  for n, want in wanted.items():  # in the target's order: params first
    if n not in saved:
      problems.append(f"{n}: in the target, not in the checkpoint")
    elif saved[n] != want:
      problems.append(f"{n}: saved {saved[n][0]} {saved[n][1]}, target {want[0]} {want[1]}")
  problems += [f"{n}: in the checkpoint, not in the target" for n in sorted(saved.keys() - names)]
  if problems:
    shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
    hint = ""
    if any(re.match(r"params\.layers\.\d+\.", n) for n in saved) and not any(
        re.match(r"params\.layers\.\d+\.", n) for n in names):
      hint = ("\nIt holds one entry per layer, the layout of dreamjax before its layers were stacked and "
              "scanned: export its parameters with `python -m launch.convert --to hf --src RUN --dst DIR` "
              "(which restacks them) and start a new run from DIR.")
    raise CheckpointMismatchError(
        f"{where} does not match the state to restore into (resume with a changed model or optimizer?):"
        f"\n  {shown}{hint}"
    )


# ---------------------------------------------------------------------------------------------
# Policies.


@dataclasses.dataclass
class _NewestGood(_policies.PreservationPolicy):
  """Preserves the newest step marked good (the rollback target), however old."""

  good: set

  def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
    newest = max((c.step for c in checkpoints if c.step in self.good), default=None)
    return [c.step == newest for c in checkpoints]


def _short(e: BaseException, limit: int = 400) -> str:
  """Returns the error on one line, without TensorStore's spec JSON, its middle cut when long."""
  text = re.sub(r"\s*\[tensorstore_spec='.*?\}'\]", "", " ".join(str(e).split()))
  if len(text) > limit:  # the OS error (e.g. 'No space left on device') is at the end
    text = f"{text[: limit // 2]} ... {text[-limit // 2 :]}"
  return f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores a run's steps under `directory` with an Orbax CheckpointManager.

  Args:
    directory: the checkpoint folder (created if missing); `RUN/checkpoints`.
    keep: how many of the newest steps to keep (None: all); the newest step passed to
      `mark_good` is kept as well.
    save_every: `save` writes steps that are multiples of this (and any step with force=True).
    async_save: write in a background thread; `save` returns once the arrays are on the host.
  """

  def __init__(self, directory, *, keep: Optional[int] = 3, save_every: int = 100, async_save: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f"Checkpointer: keep must be >= 1 or None, got {keep}")
    if save_every < 1:
      raise ValueError(f"Checkpointer: save_every must be >= 1, got {save_every}")
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))  # Orbax needs absolute paths
    self.keep, self.save_every, self.async_save = keep, save_every, async_save
    self._good: set[int] = set()
    self._pending: Optional[int] = None  # step of an async save not yet confirmed
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise CheckpointError(f"checkpoint directory {self.directory} cannot be created: {_short(e)}") from e
    self._remove_unfinished()
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=_policies.AnySavePolicy(
            [_policies.FixedIntervalPolicy(self.save_every), _policies.PreemptionCheckpointingPolicy()]
        ),
        preservation_policy=_policies.AnyPreservationPolicy(
            [_policies.LatestN(self.keep), _NewestGood(self._good)]
        ),
        enable_async_checkpointing=self.async_save,
        # Not Orbax's cleanup: it runs in the background, racing the first listing and save;
        # `_remove_unfinished` has done it, before the manager lists the steps.
        cleanup_tmp_directories=False,
    )
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def _remove_unfinished(self) -> None:
    """Deletes the folders of saves that never finished (a process killed mid-save leaves Orbax's
    `<step>.orbax-checkpoint-tmp-<time>`), here and the base model's beside it, before anything
    lists the steps: such a folder is never a checkpoint, and left there it would confuse a resume
    or a reader of the folder. Committed steps are never touched."""
    if jax.process_index() == 0:
      places = [(self.directory, lambda name: True)]
      if self.base_dir.parent.exists():
        places.append((self.base_dir.parent, lambda name: name.startswith(BASE_DIR)))
      for folder, ours in places:
        for p in sorted(folder.iterdir()):
          if ours(p.name) and is_unfinished(p.name):
            logging.warning("checkpoints: removing unfinished save %s (an interrupted or failed write)", p)
            if p.is_dir():
              p.rmtree()
            else:
              p.unlink()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"checkpoint cleanup {self.directory}")

  # -------------------------------------------------------------------------------------------
  # Steps.

  def all_steps(self) -> list[int]:
    """Returns the saved steps, oldest first (including one still being written: see `wait`)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def mark_good(self, step: int) -> None:
    """Records that `step` passed the monitor's guard: the newest such step is never deleted."""
    self._good.add(int(step))

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(int(step))

  # -------------------------------------------------------------------------------------------
  # Save.

  def save(self, step: int, state, data_position: Mapping[str, int], run_config: Mapping[str, Any],
           force: bool = False) -> bool:
    """Returns whether `step` was saved (multiples of save_every, a preemption point, or force).

    data_position: a dict of ints (or an object with `to_dict()`, e.g. MixerPosition).
    run_config: a JSON dict; it comes back as JSON does (tuples as lists).
    """
    step = int(step)
    position = _check_position(data_position)
    config = _check_config(run_config)
    self.wait()  # surfaces a failed previous async save before starting another
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if step < latest:  # Orbax only saves after its newest step
        logging.warning("checkpoint step %d not saved: %s already holds newer step %d (after an abort, "
                        "`rollback` moves the newer steps aside)", step, self.directory, latest)
      return False  # step == latest: already on disk (e.g. a final save right after a periodic one)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(position),
                                 CONFIG: ocp.args.JsonSave(config)})
    try:
      saved = self._manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)
    if saved and self.async_save:
      self._pending = step
    return saved

  def wait(self) -> None:
    """Blocks until the async save in flight is on disk; raises CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self._pending, e)
    self._pending = None

  def _failed(self, step: Optional[int], error: Exception):
    """Reopens the manager (Orbax's stays broken after a failed write) and raises CheckpointSaveError."""
    self._pending = None
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      pass  # the same error again: it is reported below
    # No tmp cleanup now: the failed save's sibling writes may still be running (Orbax stops waiting
    # at the first error) and would race the rmtree. The next Checkpointer start removes it.
    self._manager = self._make_manager()
    intact = self.latest_step()
    left = "no checkpoint before it" if intact is None else f"the newest intact checkpoint is step {intact}"
    raise CheckpointSaveError(
        f"saving checkpoint step {step} to {self.directory} failed ({_short(error)}); {left}"
    ) from error

  def close(self) -> None:
    """Waits for the save in flight and releases Orbax's threads; raises if that save failed."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -------------------------------------------------------------------------------------------
  # Restore.

  def restore(self, step: Optional[int] = None, *, abstract_state, mesh: Optional[Mesh] = None):
    """Returns (state, data_position, run_config, step) restored onto the target shardings.

    step None: the newest readable step; unreadable newer ones (corrupt, partial, without the
    commit marker) are logged as warnings and moved to `corrupt/`. A given step: exactly that one.
    abstract_state: a state (or eval_shape of one) of the run's structure; shardings as in
    `abstract_like(abstract_state, mesh)`.
    """
    self.wait()
    target = abstract_like(abstract_state, mesh)
    steps = self.all_steps()
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
      try:
        return self._restore_one(int(step), target)
      except _Unreadable as e:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: {e}") from None
    if not steps:
      raise CheckpointError(f"no checkpoint to restore in {self.directory}")
    failures = []
    for s in reversed(steps):
      try:
        restored = self._restore_one(s, target)
      except _Unreadable as e:
        _silence_closed_loop_reports()  # the failed read's pending callbacks would each print one
        logging.warning("checkpoint step %d in %s is corrupt or partial (%s); trying the previous step",
                        s, self.directory, e)
        failures.append((s, str(e)))
        continue
      if failures:
        bad = [f for f, _ in failures]
        self._move_aside(bad, CORRUPT_DIR)
        logging.warning("restored checkpoint step %d instead of the newest step %d; moved unreadable "
                        "step(s) %s to %s", s, bad[0], bad, self.directory / CORRUPT_DIR)
      return restored
    reasons = "\n  ".join(f"step {s}: {r}" for s, r in failures)
    raise CheckpointError(f"no restorable checkpoint in {self.directory}:\n  {reasons}")

  def rollback(self, step: int, *, abstract_state, mesh: Optional[Mesh] = None):
    """Returns restore(step, ...) and moves the steps after `step` to `rolled_back/`.

    For the monitor's abort-and-rollback to the last step that passed the guard: without moving
    the newer steps aside, Orbax would skip saving the re-trained steps (it saves only after its
    newest step) and a restart would resume from the rejected trajectory.
    """
    restored = self.restore(step, abstract_state=abstract_state, mesh=mesh)
    newer = [s for s in self.all_steps() if s > step]
    if newer:
      self._move_aside(newer, ROLLED_BACK_DIR)
      logging.warning("rolled back to checkpoint step %d; moved newer step(s) %s to %s", step, newer,
                      self.directory / ROLLED_BACK_DIR)
    return restored

  def _restore_one(self, step: int, target):
    where = f"checkpoint step {step} in {self.directory}"
    if not (self.step_dir(step) / _COMMIT_FILE).exists():
      raise _Unreadable(f"no commit marker {_COMMIT_FILE}: the save did not finish")
    try:
      meta = self._manager.item_metadata(step)[STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise _Unreadable(f"metadata unreadable: {_short(e)}") from None
    if meta is None:
      raise _Unreadable(f"item '{STATE}' is missing")
    _check_target(meta, target, where)  # a mismatch is the caller's, not the checkpoint's: no fallback
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore(),
                                 CONFIG: ocp.args.JsonRestore()})
    try:
      out = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      raise _Unreadable(_short(e)) from None
    if not isinstance(out[DATA], dict) or not isinstance(out[CONFIG], dict):
      raise _Unreadable(f"items '{DATA}' / '{CONFIG}' are not JSON objects")
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return out[STATE], out[DATA], out[CONFIG], step

  def _move_aside(self, steps: Sequence[int], folder: str) -> None:
    """Moves step folders into `directory/folder/` (kept for inspection) and reloads the manager."""
    if jax.process_index() == 0:
      dest = self.directory / folder
      dest.mkdir(parents=True, exist_ok=True)
      for s in steps:
        target = dest / str(s)
        if target.exists():
          target = dest / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
          self.step_dir(s).rename(target)
        except Exception as e:  # pylint: disable=broad-except
          # Object stores may not rename folders; the step must leave Orbax's view either way.
          logging.warning("could not move checkpoint step %d to %s (%s); deleting it", s, target, _short(e))
          self.step_dir(s).rmtree()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"checkpoint move aside {folder} {list(steps)}")
    self._manager.reload()

  # -------------------------------------------------------------------------------------------
  # The base model (written once).

  @property
  def base_dir(self) -> epath.Path:
    """`<directory>/../base_model`: beside the steps, not among them — the CheckpointManager cleans
    `*.orbax-checkpoint-tmp` folders in its own directory in the background, which raced with the
    base's write when it lived there."""
    return self.directory.parent / BASE_DIR

  def has_base(self) -> bool:
    return (self.base_dir / _COMMIT_FILE).exists()

  def save_base(self, params) -> None:
    """Writes the base model params once (blocking); an existing base is never overwritten."""
    if self.has_base():
      raise CheckpointError(f"base model already saved at {self.base_dir}; it is written once per run")
    # A synchronous checkpointer: the base is written once, and the async one's background metadata
    # write was seen to race ("No ArrayMetadata found for process_index=0") on a loaded CPU.
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      try:
        ckptr.save(self.base_dir, args=ocp.args.StandardSave(params), force=True)  # force: replaces an unfinished base
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointSaveError(f"saving the base model to {self.base_dir} failed ({_short(e)})") from e

  def restore_base(self, abstract_params, mesh: Optional[Mesh] = None):
    """Returns the base model params restored onto `abstract_like(abstract_params, mesh)`."""
    if not self.has_base():
      raise CheckpointError(f"no base model saved at {self.base_dir}")
    target = abstract_like(abstract_params, mesh)
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(self.base_dir).item_metadata
      if meta is None:
        raise CheckpointError(f"base model at {self.base_dir}: metadata unreadable")
      _check_target(meta, target, f"base model {self.base_dir}")
      return ckptr.restore(self.base_dir, target)


# ---------------------------------------------------------------------------------------------
# The JSON items and the resume check.


def _check_position(data_position) -> dict[str, int]:
  if hasattr(data_position, "to_dict"):
    data_position = data_position.to_dict()
  if not isinstance(data_position, Mapping):
    raise TypeError(f"data_position must be a dict of ints, got {type(data_position).__name__}")
  out = {}
  for k, v in data_position.items():
    if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise TypeError(f"data_position[{k!r}] must be an int under a str key, got {type(v).__name__} {v!r}")
    out[k] = int(v)
  return out


def _check_config(run_config) -> dict:
  if not isinstance(run_config, Mapping):
    raise TypeError(f"run_config must be a JSON dict, got {type(run_config).__name__}")
  try:
    return json.loads(json.dumps(dict(run_config)))  # tuples become lists, as they will on disk
  except (TypeError, ValueError) as e:
    raise TypeError(f"run_config is not JSON-serialisable: {e}") from None


def _diff(saved, current, path: str) -> list[str]:
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current), key=str):
      sub = f"{path}.{k}"
      if k not in saved:
        out.append(f"{sub}: absent in the checkpoint, now {current[k]!r}")
      elif k not in current:
        out.append(f"{sub}: saved {saved[k]!r}, now absent")
      else:
        out += _diff(saved[k], current[k], sub)
    return out
  return [] if saved == current else [f"{path}: saved {saved!r}, now {current!r}"]


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any],
                        keys: Sequence[str] = RESUME_MUST_MATCH) -> None:
  """Raises ResumeConfigError naming every field under `keys` that differs between the configs."""
  saved, current = _check_config(saved), _check_config(current)
  problems, changed = [], []
  for key in keys:
    if key not in saved and key not in current:
      continue
    diff = _diff(saved.get(key, "<absent>"), current.get(key, "<absent>"), key)
    if diff:
      problems += diff
      changed.append(key)
  if problems:
    lines = "\n  ".join(problems)
    raise ResumeConfigError(
        f"resume with a changed {', '.join(changed)}: the run config differs from the checkpoint's on "
        f"field(s) that must match:\n  {lines}\nStart a new run folder, or restore the original settings."
    )


def _is_closed_loop(exc) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _silence_closed_loop_reports() -> None:
  """Drops the "RuntimeError: Event loop is closed" reports of a failed Orbax read, keeping all others.

  When a corrupt step fails to restore, the storage layer's (tensorstore's) pending reads still
  complete later and post their results to the asyncio loop Orbax already closed; each such
  callback printed a traceback (hundreds of lines for one corrupt step), which buried the one
  warning that matters. The reports arrive through sys.excepthook (the callback thread's
  PyErr_Print), threading.excepthook or sys.unraisablehook; each hook is wrapped once.
  """
  if getattr(sys.excepthook, "_dreamjax_quiet", False):
    return

  def quiet_excepthook(tp, value, tb, _previous=sys.excepthook):
    if not _is_closed_loop(value):
      _previous(tp, value, tb)

  def quiet_thread_hook(args, _previous=threading.excepthook):
    if not _is_closed_loop(args.exc_value):
      _previous(args)

  def quiet_unraisable(unraisable, _previous=sys.unraisablehook):
    if not _is_closed_loop(unraisable.exc_value):
      _previous(unraisable)

  quiet_excepthook._dreamjax_quiet = True  # pylint: disable=protected-access
  sys.excepthook, threading.excepthook, sys.unraisablehook = quiet_excepthook, quiet_thread_hook, quiet_unraisable


# ---------------------------------------------------------------------------------------------
# Preemption.


class PreemptionGuard:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag that the loop checks after each step (then it
  saves and exits 0); a second signal ends the process at once.

  Use as a context manager around the loop and the run's finish (final save, summary):

      with PreemptionGuard() as guard:
        for ...:
          ...
          if guard.should_stop(step): save(force=True); break
        guard.finishing()       # a first signal from here on lets the finish complete
        close(); write_summary()

  The first signal only sets the flag (the current step, or the finish, completes); it also gives
  the signals back their default action, so a second one (Ctrl-C twice) kills the process at
  once, even inside a long XLA call. A kill never corrupts a committed checkpoint step: Orbax
  writes a step to a `*.orbax-checkpoint-tmp-*` folder and renames it when complete, and the next
  `Checkpointer` removes such leftovers. In a multi-process run no handler is installed: JAX's
  preemption service (started by `jax.distributed.initialize`) catches SIGTERM and `should_stop`
  asks it for the step all processes agree to stop at, so every host saves the same step.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self._received: Optional[int] = None
    self._finishing = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "PreemptionGuard":
    if jax.process_count() > 1:
      return self
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionGuard must be entered in the main thread (Python delivers signals there)")
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    for sig in self.signals:  # the next signal takes the default action: the process ends at once
      signal.signal(sig, signal.SIG_DFL)
    if self._received is None:
      name = signal.Signals(signum).name
      again = "Ctrl-C" if signum == signal.SIGINT else name
      if self._finishing:
        logging.warning("received %s while finishing: completing the final save and summary (%s again ends the "
                        "process at once)", name, again)
      else:
        logging.warning("received %s: finishing the current step, then saving and exiting (%s again ends the "
                        "process at once; the newest saved checkpoint stays intact)", name, again)
    self._received = signum

  def finishing(self) -> None:
    """Marks the start of the run's finish: a first signal from now on only lets it complete."""
    self._finishing = True

  @property
  def requested(self) -> bool:
    """Whether a stop signal has arrived in this process."""
    return self._received is not None

  def should_stop(self, step: int) -> bool:
    """Returns whether the loop should save `step` and exit (call once per step, on every host)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      return multihost_utils.reached_preemption_sync_point(int(step))
    return self.requested
