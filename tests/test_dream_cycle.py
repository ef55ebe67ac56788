"""The dream cycle: dream → train → monitor → checkpoint, resumed at cycle granularity."""

import collections
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dreamjax.data import jsonl
from dreamjax.dream import asset_path, cycle, memory, recall
from dreamjax.dream.memory import Memory
from dreamjax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(scenarios=4, max_new_tokens=6, max_prompt_tokens=64, gen_batch_size=8, walk_length=2, batch_size=4,
            max_context_len=64, max_response_len=32, eval_examples=4, mesh="1,1")


def params_at(run_dir, step):
  """Returns the params of checkpoint `step` as a flat {path: numpy array}."""
  base = step == ckpt_lib.BASE_DIR  # the base holds the params alone
  path = (os.path.join(run_dir, ckpt_lib.BASE_DIR) if base
          else os.path.join(run_dir, "checkpoints", str(step), ckpt_lib.STATE))
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(path)
  return {k: np.asarray(v) for k, v in _flatten(tree if base else tree["params"]).items()}


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}"))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(_flatten(v, f"{prefix}/{i}"))
    return out
  return {prefix: tree}


def lines(path):
  return [json.loads(l) for l in open(path, encoding="utf-8")]


def test_two_cycles_resume_and_redo_a_killed_cycle(tmp_path):
  run_dir = str(tmp_path / "run")
  mem = str(tmp_path / "mem.jsonl")
  shutil.copy(asset_path("memories.jsonl"), mem)
  kw = dict(TINY, memories=mem, replay_cycles=2, fresh_share=0.9)
  s1 = cycle.run(cycle.CycleConfig(run_dir=run_dir, cycles=1, **kw))
  assert s1["status"] == "finished" and s1["cycles_done"] == 1 and s1["step"] > 0
  step1 = s1["step"]
  n_mem = len(memory.read_memories(mem))
  c0 = s1["per_cycle"][0]["consolidation"]
  assert c0 == {"fresh": n_mem, "consolidated": 0, "fresh_seed_share": pytest.approx(1.0), "memories": n_mem}
  held_out = jsonl.read_preferences(os.path.join(run_dir, cycle.EVAL_SCENARIOS))
  assert len(held_out) == 8 and s1["per_cycle"][0]["held_out_margin"] is not None
  # The fast stage: a memory added between cycles enters at the next cycle, fresh.
  recall.append_memory(mem, Memory("new1", "The user now wants every PR reviewed by two people.", tags=("testing",)))
  # Resume: cycles=2 on the same folder continues at cycle 1 from the saved state.
  s2 = cycle.run(cycle.CycleConfig(run_dir=run_dir, cycles=2, **kw))
  c1 = s2["per_cycle"][0]["consolidation"]
  assert c1["memories"] == n_mem + 1 and c1["fresh"] == n_mem + 1  # replay_cycles=2: age 1 is still fresh
  ledger = json.load(open(os.path.join(run_dir, "memory_ledger.json")))
  assert ledger["new1"] == 1 and set(ledger.values()) == {0, 1}
  assert jsonl.read_preferences(os.path.join(run_dir, cycle.EVAL_SCENARIOS)) == held_out  # kept on resume
  assert s2["start_cycle"] == 1 and s2["cycles_done"] == 2
  assert s2["per_cycle"][0]["model_step"] == step1 and s2["step"] > step1
  step2 = s2["step"]

  # Triplets: TRL-valid, no duplicate ids, provenance model step increases between cycles.
  path = os.path.join(run_dir, cycle.TRIPLETS)
  recs = lines(path)
  assert len(jsonl.read_preferences(path)) == len(recs) == s1["kept"] + s2["kept"] > 0
  assert len({r["id"] for r in recs}) == len(recs)
  steps_by_seed = collections.defaultdict(set)
  for r in recs:
    steps_by_seed[r["provenance"]["seed"]].add(r["provenance"]["model_step"])
  assert dict(steps_by_seed) == {0: {0}, 1: {step1}}
  kinds = collections.Counter(r["kind"] for r in recs)
  assert set(kinds) == {"accept", "push_back"}

  # One checkpoint per cycle (plus the base); the params moved in each cycle.
  ckpts = os.path.join(run_dir, "checkpoints")
  assert {str(step1), str(step2)} <= set(os.listdir(ckpts))
  assert os.path.isdir(os.path.join(run_dir, ckpt_lib.BASE_DIR))
  p0, p1, p2 = (params_at(run_dir, ckpt_lib.BASE_DIR), params_at(run_dir, step1),
                params_at(run_dir, step2))
  assert p0.keys() == p1.keys() == p2.keys()
  assert any(not np.array_equal(p0[k], p1[k]) for k in p0)
  assert any(not np.array_equal(p1[k], p2[k]) for k in p1)
  cyc = lines(os.path.join(run_dir, "cycles.jsonl"))
  assert [c["cycle"] for c in cyc] == [0, 1] and all(c["guard"]["action"] == "continue" for c in cyc)
  assert [c["step"] for c in cyc] == [step1, step2] and all(c["monitor"]["perplexity/ratio"] > 0 for c in cyc)
  assert [json.loads(l)["kind"] for l in open(os.path.join(run_dir, "monitor.jsonl"))].count("eval") == 2

  # Killed after cycle 1's dream, before its checkpoint: the rerun redoes cycle 1, skips its
  # written scenarios (no duplicates, no lost triplets) and trains to the same parameters (bitwise on CPU).
  before = open(path, "rb").read()
  shutil.rmtree(os.path.join(ckpts, str(step2)))
  s3 = cycle.run(cycle.CycleConfig(run_dir=run_dir, cycles=2, **kw))
  assert s3["start_cycle"] == 1 and s3["step"] == step2
  redo = s3["per_cycle"][0]
  assert redo["kept"] == 0 and redo["skipped_existing"] == s2["per_cycle"][0]["kept"]
  assert open(path, "rb").read() == before
  p2b = params_at(run_dir, step2)
  for k in p2:
    np.testing.assert_array_equal(p2b[k], p2[k], err_msg=k)



def test_ctrl_c_in_the_dream_stops_between_chunks_and_the_rerun_redoes_the_cycle(tmp_path):
  """Progress per phase; a stop signal during the dream ends the round after the current chunk's
  generation (written triplets kept); the rerun redoes the cycle, and a third run has nothing to do."""
  run_dir = str(tmp_path / "run")
  cfg = cycle.CycleConfig(run_dir=run_dir, cycles=1, **TINY)  # 4 scenarios, 2 per generate call
  said = []

  def ctrl_c_after_the_first_chunk(line):
    said.append(line)
    if "scenarios dreamt" in line:
      os.kill(os.getpid(), signal.SIGINT)

  s1 = cycle.run(cfg, progress=ctrl_c_after_the_first_chunk)
  assert s1["status"].startswith("preempted in cycle 0's dream") and s1["cycles_done"] == 0 and s1["step"] == 0
  assert said[:3] == ["reading the memories, templates and rules…", "loading qwen3-tiny…", f"setting up {run_dir}…"]
  dreamt = [x for x in said if "dreamt" in x]
  assert len(dreamt) == 1 and re.fullmatch(r"cycle 0 \(of 1\): 2/4 scenarios dreamt \(10 responses: generate "
                                           r"[\d.]+ s, score [\d.]+ s\)", dreamt[0])
  assert not any(d.isdigit() for d in os.listdir(os.path.join(run_dir, "checkpoints")))
  path = os.path.join(run_dir, cycle.TRIPLETS)
  written = lines(path) if os.path.exists(path) else []
  said = []
  s2 = cycle.run(cfg, progress=said.append)
  assert s2["status"] == "finished" and s2["cycles_done"] == 1 and s2["step"] > 0
  assert s2["per_cycle"][0]["skipped_existing"] == len(written)
  phases = ["dreaming 4 scenarios", "scenarios dreamt", "training on the cycle's", "evaluating"]
  at = [next(i for i, x in enumerate(said) if p in x) for p in phases]
  assert at == sorted(at), said
  before = open(os.path.join(run_dir, "summary.json")).read()
  s3 = cycle.run(cfg)
  assert s3["nothing_to_do"] and s3["cycles_done"] == 1 and s3["step"] == s2["step"]
  assert open(os.path.join(run_dir, "summary.json")).read() == before


def test_resume_with_changed_settings_is_refused(tmp_path):
  run_dir = str(tmp_path / "run")
  os.makedirs(run_dir)
  saved = dict(cycle.CycleConfig(run_dir=run_dir, **TINY).to_json(), scenarios=99)
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(saved, f)
  with pytest.raises(cycle.RunError, match="config.json.*scenarios"):
    cycle.run(cycle.CycleConfig(run_dir=run_dir, **TINY))


def test_model_judge_scorer_and_no_held_out(tmp_path):
  run_dir = str(tmp_path / "run")
  s = cycle.run(cycle.CycleConfig(run_dir=run_dir, cycles=1, scorer="judge", judge="current", eval_scenarios=0,
                                  min_margin=-1e9, templates=asset_path("templates.jsonl"), **TINY))
  assert s["status"] == "finished" and s["kept"] > 0 and s["per_cycle"][0]["held_out_margin"] is None
  recs = lines(os.path.join(run_dir, cycle.TRIPLETS))
  for r in recs:  # the judge's scores and reasons are in the provenance; no targets: best vs worst answer
    assert r["provenance"]["reasons"]["chosen"].startswith("log p(yes)=")
    assert r["provenance"]["scores"]["chosen"] >= r["provenance"]["scores"]["rejected"]
  assert not os.path.exists(os.path.join(run_dir, cycle.EVAL_SCENARIOS))


@pytest.mark.parametrize("kw, match", [
    (dict(cycles=0), "--cycles: must be >= 1"),
    (dict(scorer="oracle"), "--scorer: 'oracle'"),
    (dict(scorer="command"), "--scorer command needs --scorer_command"),
    (dict(replay_decay=0.0), "--replay_decay: must be in"),
    (dict(fresh_share=2.0), "--fresh_share: must be in"),
    (dict(judge_template="{prompt} {oops}"), "--judge_template"),
    (dict(temperatures=(0.5,), samples_per_temperature=1), "--temperatures × --samples_per_temperature"),
    (dict(optimizer="sgd"), "--optimizer: 'sgd' is not one of"),
    (dict(memories="/nonexistent/mem.jsonl"), "--memories: '/nonexistent/mem.jsonl' is not a file"),
])
def test_bad_settings_name_the_flag(tmp_path, kw, match):
  with pytest.raises(cycle.RunError, match=match):
    cycle.run(cycle.CycleConfig(run_dir=str(tmp_path / "run"), **dict(TINY, **kw)))


def test_bad_memory_file_names_file_and_line(tmp_path):
  mem = tmp_path / "mem.jsonl"
  mem.write_text('{"id": "a", "text": "one"}\n{"text": "no id"}\n')
  with pytest.raises(jsonl.DataError, match=r"mem.jsonl:2"):
    cycle.run(cycle.CycleConfig(run_dir=str(tmp_path / "run"), memories=str(mem), **TINY))


def test_launcher_bad_flag_exits_2_with_a_clear_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", "launch.dream", "--run_dir", str(tmp_path / "r"), "--scenarios", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "error: --scenarios: must be >= 1, got 0" in out.stderr
  assert not os.path.exists(tmp_path / "r" / "checkpoints")


def test_every_training_option_reaches_the_dream_step(tmp_path):
  """launch.dream has every training flag (one definition, dreamjax.train.options) and the cycle's
  step runs with them: the same cycle with dropout, bf16, remat, accumulation and a schedule
  trains differently from the plain one, and both their checkpoints record the options."""
  from dreamjax.train import options as options_lib  # pylint: disable=g-import-not-at-top

  train_fields = {f.name for f in dataclasses.fields(options_lib.TrainOptions)}
  assert train_fields <= {f.name for f in dataclasses.fields(cycle.CycleConfig)}
  extra = dict(dropout=0.3, bf16=True, remat=True, remat_policy="dots", grad_accum=2, schedule="cosine",
               warmup_steps=1, weight_decay=0.01)
  runs = {}
  for name, kw in (("plain", {}), ("options", extra)):
    run_dir = str(tmp_path / name)
    summary = cycle.run(cycle.CycleConfig(run_dir=run_dir, cycles=1, **TINY, **kw))
    assert summary["status"] == "finished" and summary["step"] >= 1, summary
    recorded = json.load(open(os.path.join(run_dir, "config.json")))
    assert all(recorded[k] == v for k, v in kw.items())
    runs[name] = params_at(run_dir, summary["step"])
  assert any(not np.array_equal(a, b) for a, b in zip(runs["plain"].values(), runs["options"].values()))
