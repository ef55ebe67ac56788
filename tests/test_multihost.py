"""Multi-process training for real: launch.train as two local processes of 4 fake CPU devices each
(jax.distributed with a local coordinator, gloo collectives), against one process of 8 devices."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dreamjax.train import loop
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import run_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(max_steps=12, batch_size=8, eval_every=3, eval_examples=4, mesh="2,4", max_context_len=64,
            max_response_len=48, save_every=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_two(run_dir: str) -> list[subprocess.Popen]:
  """Starts launch.train as processes 0 and 1 of a 2-process run (the documented environment)."""
  flags = [f"--{k}={v}" for k, v in FAST.items()] + [f"--run_dir={run_dir}"]
  port = _free_port()
  xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  procs = []
  for i in range(2):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla + " --xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-m", "launch.train", *flags], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs, timeout=240) -> list[tuple[int, str, str]]:
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=timeout)
    out.append((p.returncode, stdout, stderr))
  return out


def leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_two_processes_train_like_one_and_stop_together(tmp_path):
  # One process, 8 devices (this test process): the reference run.
  ref = loop.run(loop.RunConfig(run_dir=str(tmp_path / "one"), **FAST))
  assert ref["status"] == "finished" and ref["steps"] == 12

  # Two processes × 4 devices; SIGTERM to process 1 once step 2 is on disk: both stop at one step.
  run_dir = str(tmp_path / "two")
  procs = launch_two(run_dir)
  deadline = time.time() + 200
  while not os.path.isdir(os.path.join(run_dir, "checkpoints", "2")) and time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  results = finish(procs)
  for rc, stdout, stderr in results:
    assert rc == 0, stderr[-2000:]
  statuses = [json.loads(stdout[stdout.index("{"):])["status"] for _, stdout, _ in results]
  assert statuses[0] == statuses[1] and statuses[0].startswith("preempted at step"), statuses
  stopped = int(re.search(r"step (\d+)", statuses[0]).group(1))
  assert 2 <= stopped < 12
  assert max(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints"))) == stopped
  # Only process 0 wrote the run's files: one summary, one guard line per eval, no duplicates.
  guard_steps = [json.loads(x)["step"] for x in open(os.path.join(run_dir, "monitor.jsonl"))]
  assert guard_steps == sorted(set(guard_steps))

  # Both resume and finish; the result equals the one-process run's to float32 round-off (the
  # all-reduce adds the shards in another order across processes).
  for rc, _, stderr in finish(launch_two(run_dir)):
    assert rc == 0, stderr[-2000:]
  summary = json.load(open(os.path.join(run_dir, "summary.json")))
  assert summary["status"] == "finished" and summary["steps"] == 12
  got, want = run_params.restore(run_dir), run_params.restore(str(tmp_path / "one"))
  assert got.step == want.step == 12
  for a, b in zip(leaves(got.params), leaves(want.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("env,match", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
    ({}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 is not in 0\.\.JAX_NUM_PROCESSES-1=1"),
])
def test_a_bad_multi_process_environment_is_named_before_anything_starts(monkeypatch, env, match):
  for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    mesh_lib.initialize_distributed()
  assert not jax.distributed.is_initialized()


def test_one_process_is_a_no_op(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.initialize_distributed() is False and not jax.distributed.is_initialized()
