"""Device mesh and sharding: axes ('data', 'fsdp'); a declarative table for parameters.

Batches shard their leading axis over both axes (every device holds B / n_devices examples),
and so do the model's activations inside the step (dreamjax.model.shard, under `jax.set_mesh`).
Parameters (and optimizer state) shard one dimension over 'fsdp': the table below names, per
parameter role, which dimensions may take it, in order of preference, counted from the end so
that a stacked layer leaf (L, in, out) (dreamjax.model.layout) reads like its (in, out) layer;
anything not in the table takes the largest dimension divisible by the fsdp size. The layer axis
of a stack is never sharded (the layer scan slices it). Vectors and keys stay replicated.
No pmap: a mesh with fsdp = 1 is plain data parallelism.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dreamjax.model.layout import LAYERS
from dreamjax.model.shard import BATCH_AXES

AXES = ("data", "fsdp")
BATCH = P(BATCH_AXES)

# (regex on the parameter path, dims that may carry 'fsdp', in order of preference, from the end).
# Matrices are stored (in, out): the wide side of the vocabulary matrices is the vocab.
PARAM_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"\['embed'\]$", (-1, -2)),  # (V, D): shard the model dim: a lookup stays on its own rows
    (r"\['lm_head'\]$", (-1, -2)),  # (D, V): shard the vocabulary
    (r"\['(q|k|v)_proj'\]$|\['in_proj_\w+'\]$|\['(gate|up)_proj'\]$", (-1, -2)),  # (D, out)
    (r"\['(o_proj|out_proj|down_proj)'\]$", (-2, -1)),  # (in, D)
    (r"\['conv_weight'\]$", (-1,)),  # (K, channels)
)


def make_mesh(shape: Sequence[int] = (-1, 1), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Returns a ('data', 'fsdp') mesh; -1 in `shape` takes the remaining devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
  # Auto axes: XLA propagates shardings inside the step (GSPMD); in/out shardings are explicit.
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(tuple(shape), AXES, devices=devices, axis_types=auto)


def parse_mesh_flag(text: str) -> tuple[int, int]:
  """Returns (data, fsdp) from a flag like '8,1' or '2x4' (-1 allowed once)."""
  parts = re.split(r"[x,]", text.strip())
  try:
    vals = tuple(int(p) for p in parts)
  except ValueError:
    vals = ()
  if len(vals) != 2:
    raise ValueError(f"--mesh: expected 'DATA,FSDP' such as '8,1' or '2,4', got {text!r}")
  return vals


def leaf_spec(path: str, shape: tuple[int, ...], fsdp: int) -> P:
  """Returns the PartitionSpec of one array given its path and shape (see the module docstring)."""
  if len(shape) < 2 or fsdp == 1:
    return P()
  first = 1 if f"['{LAYERS}']" in path else 0  # a stack's layer axis stays whole
  if len(shape) - first < 2:  # a (stacked) vector
    return P()
  preferred = None
  for pattern, dims in PARAM_RULES:
    if re.search(pattern, path):
      preferred = [d % len(shape) for d in dims if -len(shape) <= d]
      break
  if preferred is None:
    preferred = sorted(range(len(shape)), key=lambda d: -shape[d])
  preferred = [d for d in preferred if d >= first]
  for d in preferred:
    if shape[d] % fsdp == 0 and shape[d] >= fsdp:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh):
  """Returns NamedShardings for every array leaf of `tree` (params or optimizer state)."""
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    return NamedSharding(mesh, leaf_spec(jax.tree_util.keystr(path), tuple(np.shape(leaf)), fsdp))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def initialize_distributed() -> bool:
  """Initialises multi-process JAX when the environment launches several processes; returns whether
  this is one of several.

  JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (0..N-1) in
  each process's environment: an explicit launch (several hosts, or several processes on one
  machine). Without them, a cluster JAX detects by itself (SLURM, TPU pod metadata). CPU
  collectives across processes go through gloo. Call before anything touches a device.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(v)]
    if missing:
      verb = "is" if len(missing) == 1 else "are"
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} {verb} not: a multi-process "
                       "launch sets all three in every process")
    try:
      n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError:
      raise ValueError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID={env['JAX_PROCESS_ID']!r} "
                       "must be integers") from None
    if not 0 <= i < n:
      raise ValueError(f"JAX_PROCESS_ID={i} is not in 0..JAX_NUM_PROCESSES-1={n - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
  elif env.get("SLURM_NTASKS", "1") != "1" or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Whether this process writes the run's files (logs, summaries): process 0."""
  return jax.process_index() == 0


def global_array(x, sharding: NamedSharding) -> jax.Array:
  """Returns a global array with `sharding` from a host value every process holds whole (each
  process fills its own devices' shards; nothing is gathered or sent)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_batch(batch, mesh: Mesh):
  """Returns the batch pytree (host arrays, the same on every process) as global arrays sharded on
  their leading axis over the mesh's batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: global_array(x, sharding), batch)


def put_replicated(tree, mesh: Mesh):
  """Returns the pytree of host arrays (the same on every process) as global arrays replicated on
  every device of the mesh (small inputs such as the evaluator's held-out batches)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: global_array(x, sharding), tree)


def param_placer(mesh: Mesh):
  """Returns `place(path, host_array) -> global array` for `hf.load_params`: each parameter goes
  straight onto its sharding (see `leaf_spec`), never whole onto one device."""
  fsdp = mesh.shape["fsdp"]

  def place(path: tuple, x):
    keystr = "".join(f"['{k}']" for k in path)
    return global_array(x, NamedSharding(mesh, leaf_spec(keystr, tuple(np.shape(x)), fsdp)))

  return place
