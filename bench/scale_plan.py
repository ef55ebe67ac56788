"""Planning past the machines we have: per-device memory of the real train step for 27B / 8B models.

    python bench/scale_plan.py [--models qwen3_5-27b,qwen3-8b] [--contexts 8192,32768,131072]
        [--modes frozen,full] [--optimizers apollo_mini,adamw] [--platform cpu|tpu] [--layers N]

Lowers and compiles the project's train step (ORPO, remat on, bf16 params, float32 optimizer
moments, response 512, global batch 8) for full-size configs on an 8-device mesh ('data' 1 ×
'fsdp' 8: parameters, gradients and optimizer state sharded 8 ways, one example per device) with
abstract inputs (jax.ShapeDtypeStruct: nothing is allocated), and prints XLA's compiled memory
analysis per device, one JSON line per (model, context, optimizer, mode):

  per-device bytes = arguments + outputs + temporaries − aliased (donated state)

--platform cpu (default): 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set here). XLA:CPU has no bfloat16 arithmetic: it converts bf16 operands to float32, and its
loop-invariant code motion hoists those converts out of the layer loop, so that the default CPU
compile carries float32 copies of whole stacks of bf16 weights, gradients and caches that a GPU
or TPU program does not have. The plan therefore compiles with that one pass disabled
(`xla_flags` in the JSON); --keep_cpu_licm keeps it. --platform tpu compiles the same program
for an 8-chip TPU v5p slice without any TPU (deviceless AOT: `pip install "jax[tpu]"` for
libtpu, no hardware), where bf16 is native. Either way it is a compiler's plan, not a measured
peak: leave headroom.

Each line also counts XLA's "Involuntary full rematerialization" warnings (a sharding that forces
a whole tensor to be replicated) and the compile time; the step scans its layers, so compile time
does not grow with depth (`--layers 4` vs the default full depth shows it).
"""

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time

PLATFORM = "tpu" if "--platform=tpu" in sys.argv or ("--platform" in sys.argv and "tpu" in sys.argv) else "cpu"
# XLA:CPU hoists the float32 converts of bf16 operands out of the layer loop (loop-invariant code
# motion), turning per-layer temporaries into whole-stack float32 copies that no accelerator
# program has; the plan compiles without that pass unless --keep_cpu_licm (both figures in BUILD.md).
NO_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
if PLATFORM == "cpu":
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
  if "--keep_cpu_licm" not in sys.argv and "--xla_disable_hlo_passes" not in flags:
    flags += " " + NO_LICM
  os.environ["XLA_FLAGS"] = flags
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax

from dreamjax import model as M
from dreamjax import optim
from dreamjax.train import batch as batch_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import step as step_lib

GB = 1e9


def qwen3_5_27b(layers: int = 64) -> M.ModelConfig:
  """Qwen3.5-27B's text config (values of its published config.json, text_config)."""
  interval = 4  # full_attention_interval: every 4th layer is full attention
  return M.ModelConfig(
      model_type="qwen3_5_text", vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_layers=layers,
      num_heads=24, num_kv_heads=4, head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000_000.0,
      partial_rotary_factor=0.25, tie_embeddings=False,
      layer_types=tuple(M.FULL if (i + 1) % interval == 0 else M.LINEAR for i in range(layers)),
      attn_output_gate=True, norm_zero_centered=True, linear_num_key_heads=16, linear_num_value_heads=48,
      linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel=4, chunk_size=64,
      eos_token_ids=(248044,), max_position_embeddings=262144)


def qwen3_8b(layers: int = 36) -> M.ModelConfig:
  """Qwen3-8B's config (values of its published config.json)."""
  return M.ModelConfig(
      model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=layers,
      num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_embeddings=False,
      eos_token_ids=(151645,), max_position_embeddings=40960)


MODELS = {"qwen3_5-27b": ("Qwen3.5-27B", qwen3_5_27b, 64), "qwen3-8b": ("Qwen3-8B", qwen3_8b, 36)}


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@contextlib.contextmanager
def captured_stderr():
  """Yields a function returning what the process wrote to fd 2 meanwhile (XLA's C++ warnings)."""
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    text = {}
    try:
      yield lambda: text.get("v", "")
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text["v"] = tmp.read().decode(errors="replace")


def plan(config, mode, opt_name, context, response, batch, mesh):
  params = jax.eval_shape(lambda: M.init_params(config, jax.random.PRNGKey(0), dtype=jnp.bfloat16))
  params32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  opt = optim.apollo_mini(1e-5) if opt_name == "apollo_mini" else optax.adamw(1e-5)
  opt_state = jax.eval_shape(opt.init, params32)  # float32 moments beside bf16 params
  state = jax.eval_shape(lambda p, o: step_lib.TrainState(p, o, jnp.zeros((), jnp.int32), jax.random.PRNGKey(0)),
                         params, opt_state)
  state = abstract(state, mesh_lib.tree_shardings(state, mesh))
  shapes = jax.eval_shape(lambda: batch_lib.PreferenceBatch(
      jnp.zeros((batch, context), jnp.int32), jnp.zeros((batch, context), jnp.int32),
      jnp.zeros((batch, response), jnp.int32), jnp.zeros((batch, response), jnp.int32),
      jnp.zeros((batch, response), jnp.int32), jnp.zeros((batch, response), jnp.int32), jnp.zeros((batch,))))
  bs = mesh_lib.batch_sharding(mesh)
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bs), shapes)
  step = step_lib.make_train_step(config, "orpo", opt, mode, mesh=mesh, remat=True)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  out = {
      "params_billion": round(n_params / 1e9, 3), "mode": mode, "optimizer": opt_name, "context": context,
      "response": response, "global_batch": batch, "mesh": dict(mesh.shape), "remat": True,
      "param_dtype": "bfloat16", "moment_dtype": "float32"}
  t0 = time.time()
  try:
    with captured_stderr() as stderr:
      compiled = step.lower(state, abstract_batch).compile()
  except jax.errors.JaxRuntimeError as e:  # a TPU compile refuses a program larger than the chip's HBM
    found = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
    if not found:
      raise
    return dict(out, fits_hbm=False, temp_gb_required=float(found.group(1)), hbm_gb=float(found.group(2)),
                compile_s=round(time.time() - t0, 1))
  seconds = time.time() - t0
  m = compiled.memory_analysis()
  per_device = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  out.update({
      "per_device_gb": round(per_device / GB, 2), "arguments_gb": round(m.argument_size_in_bytes / GB, 2),
      "temp_gb": round(m.temp_size_in_bytes / GB, 2), "outputs_gb": round(m.output_size_in_bytes / GB, 2),
      "aliased_gb": round(m.alias_size_in_bytes / GB, 2), "fits_80gb": per_device <= 80 * GB,
      "involuntary_remat_warnings": stderr().count("Involuntary full rematerialization"),
      "compile_s": round(seconds, 1),
  })
  return out


def make_mesh(topology: str):
  if PLATFORM == "cpu":
    if jax.device_count() != 8:
      raise SystemExit(f"needs 8 (fake) devices, have {jax.device_count()}; set "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts")
    return mesh_lib.make_mesh((1, 8)), f"{jax.device_count()} CPU devices"
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  if len(devices) != 8:
    raise SystemExit(f"--topology {topology} has {len(devices)} chips; the plan needs 8")
  return mesh_lib.make_mesh((1, 8), devices=devices), f"{topology} ({devices[0].device_kind}), deviceless"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="qwen3_5-27b,qwen3-8b")
  ap.add_argument("--contexts", default="8192,32768,131072")
  ap.add_argument("--modes", default="frozen,full")
  ap.add_argument("--optimizers", default="apollo_mini,adamw")
  ap.add_argument("--response", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--layers", type=int, default=0, help="a shorter stack of the same pattern (0: the model's own)")
  ap.add_argument("--platform", choices=["cpu", "tpu"], default="cpu")
  ap.add_argument("--topology", default="v5p:2x2x2", help="with --platform tpu: an 8-chip TPU topology")
  ap.add_argument("--keep_cpu_licm", action="store_true", help="compile with XLA:CPU's loop-invariant code motion")
  args = ap.parse_args()
  mesh, where = make_mesh(args.topology)
  for key in args.models.split(","):
    name, make, depth = MODELS[key]
    layers = args.layers or depth
    config = make(layers)
    if args.platform == "tpu":  # traced on a CPU host: name the accelerator's attention block (attention.default_block)
      config = config.replace(attention_block=512)
    label = name if layers == depth else f"{name} ({layers} layers)"
    for context in (int(c) for c in args.contexts.split(",")):
      for opt_name in args.optimizers.split(","):
        for mode in args.modes.split(","):
          line = {"bench": "scale_plan", "model": label, "platform": args.platform, "devices": where,
                  "xla_flags": os.environ.get("XLA_FLAGS", "").strip()}
          line.update(plan(config, mode, opt_name, context, args.response, args.batch, mesh))
          print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
