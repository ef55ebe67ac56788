"""The two-stage memory: retrieval into the prompt (fast) and the consolidation schedule (slow)."""

import collections
import json
import math
import os

import numpy as np
import pytest

from dreamjax.data.jsonl import DataError
from dreamjax.dream import consolidate, memory, recall, scenario, walk
from dreamjax.dream.memory import Memory


def _graph(mems):
  return memory.build_graph(mems)


MEMS = [
    Memory("a", "Deleting failing tests broke the build last week.", tags=("ci",)),
    Memory("b", "The user likes short commit messages.", tags=("style",)),
    Memory("c", "Force-push to main is forbidden by the team.", tags=("git",)),
    Memory("d", "The user prefers tabs over spaces.", tags=("style",)),
    Memory("e", "Flaky tests are quarantined, never deleted.", tags=("ci", "tests")),
]


def _tfidf_reference(docs, query):
  """Independent re-derivation: TF-IDF cosine with dicts and math (module docstring formula)."""
  n = len(docs)
  df = collections.Counter(w for d in docs for w in set(d))
  idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
  def vec(ws):
    tf = collections.Counter(w for w in ws if w in idf)
    return {w: c * idf[w] for w, c in tf.items()}
  def cos(u, v):
    dot = sum(u[w] * v.get(w, 0.0) for w in u)
    nu, nv = math.sqrt(sum(x * x for x in u.values())), math.sqrt(sum(x * x for x in v.values()))
    return dot / (nu * nv) if nu and nv else 0.0
  q = vec(query)
  return [cos(vec(d), q) for d in docs]


def test_recall_scores_match_a_reference_tfidf():
  g = _graph(MEMS)
  r = recall.Recall(g)
  query = "Should I delete the failing tests? CI is red."
  docs = [recall.words(m.text) + [w for t in m.tags for w in recall.words(t)] for m in MEMS]
  want = _tfidf_reference(docs, recall.words(query))
  np.testing.assert_allclose(r.scores(query), want, rtol=1e-12, atol=1e-12)
  top = r.top(query, 2)
  assert [m.id for m, _ in top] == ["a", "e"]  # the two memories about tests and CI
  ranked = [MEMS[i].id for i in sorted(range(len(MEMS)), key=lambda i: -want[i]) if MEMS[i].id != "a"]
  assert [m.id for m, _ in r.top(query, 2, exclude=["a"])] == ranked[:2]
  assert r.top("quantum chromodynamics", 3) == []  # nothing in common: nothing recalled
  assert r.top(query, 0) == []


def test_recall_uses_embeddings_when_every_memory_has_one():
  mems = [Memory("x", "one", embedding=(1.0, 0.0, 0.0)), Memory("y", "two", embedding=(0.0, 1.0, 0.0)),
          Memory("z", "three", embedding=(1.0, 1.0, 0.0))]
  r = recall.Recall(_graph(mems))
  s = r.scores("unrelated words", embedding=[2.0, 0.1, 0.0])
  q = np.array([2.0, 0.1, 0.0]) / np.linalg.norm([2.0, 0.1, 0.0])
  np.testing.assert_allclose(s, [q[0], q[1], (q[0] + q[1]) / math.sqrt(2)], rtol=1e-12)
  with pytest.raises(ValueError, match="3"):
    r.scores("x", embedding=[1.0, 2.0])


def test_with_memories_plain_and_chat():
  block = recall.memory_block(MEMS[:2])
  assert block == f"- {MEMS[0].text}\n- {MEMS[1].text}"
  assert recall.with_memories("User: hi", block) == f"Relevant memories:\n{block}\n\nUser: hi"
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
  out = recall.with_memories(chat, block)
  assert out[0]["content"] == f"Be brief.\n\nRelevant memories:\n{block}" and out[1] == chat[1]
  assert chat[0]["content"] == "Be brief."  # the input is not modified
  out = recall.with_memories([{"role": "user", "content": "hi"}], block)
  assert out[0] == {"role": "system", "content": f"Relevant memories:\n{block}"}
  assert recall.with_memories("p", "") == "p"


def test_append_memory_appends_validates_and_keeps_the_file(tmp_path):
  path = str(tmp_path / "mem.jsonl")
  with open(path, "w") as f:
    f.write(json.dumps({"id": "a", "text": "one"}))  # no trailing newline
  recall.append_memory(path, Memory("b", "two", links=(("a", 1.0),)))
  assert [m.id for m in memory.read_memories(path)] == ["a", "b"]
  before = open(path, "rb").read()
  with pytest.raises(DataError, match=r"mem.jsonl:3: field 'id' 'a' is already"):
    recall.append_memory(path, Memory("a", "again"))
  with pytest.raises(DataError, match=r"mem.jsonl:3: field 'links\[0\]' names unknown memory 'zz'"):
    recall.append_memory(path, Memory("c", "three", links=(("zz", 1.0),)))
  with pytest.raises(DataError, match=r"mem.jsonl:3: field 'text' is empty"):
    recall.append_memory(path, Memory("c", "  "))
  assert open(path, "rb").read() == before
  new = str(tmp_path / "new.jsonl")
  recall.append_memory(new, Memory("n", "first"))
  assert [m.id for m in memory.read_memories(new)] == ["n"]


def test_template_recalled_slot_brings_relevant_memories_outside_the_scenario():
  t = scenario.parse_template({"id": "t", "kind": "push_back", "format": "plain",
                               "prompt": "{memories}\nAlso remembered:\n{recalled}\nUser: go"}, "x:1")
  assert t.uses_recall
  g = _graph(MEMS)
  coll = walk.Collision((walk.Walk(0, (0,)),))  # the scenario holds memory "a" only
  sc = scenario.render(t, g, coll, recall_k=1)
  # "e" shares "tests" with "a": the most relevant memory not already in the scenario.
  assert sc.prompt == f"- {MEMS[0].text}\nAlso remembered:\n- {MEMS[4].text}\nUser: go"
  with pytest.raises(DataError, match="recalld"):
    scenario.parse_template({"id": "t", "kind": "k", "format": "plain", "prompt": "{recalld}"}, "x:1")


def test_schedule_weights_follow_the_formula():
  s = consolidate.ConsolidationSchedule(replay_cycles=3, decay=0.5, fresh_share=0.75)
  ages = np.array([0, 1, 2, 3, 7])
  p = s.seed_weights(ages)
  u = np.array([1.0, 0.5, 0.25])
  want = np.concatenate([0.75 * u / u.sum(), [0.125, 0.125]])
  np.testing.assert_allclose(p, want, rtol=1e-12)
  np.testing.assert_allclose(s.seed_weights(np.array([0, 1])), [2 / 3, 1 / 3])  # no old: fresh take all
  np.testing.assert_allclose(s.seed_weights(np.array([5, 9, 3])), [1 / 3] * 3)  # no fresh: uniform replay
  np.testing.assert_allclose(consolidate.ConsolidationSchedule(replay_cycles=0).seed_weights(ages), [0.2] * 5)
  summ = consolidate.summary(ages, s, p)
  assert summ["fresh"] == 3 and summ["consolidated"] == 2 and summ["fresh_seed_share"] == pytest.approx(0.75)
  for bad in (dict(replay_cycles=-1), dict(decay=0.0), dict(decay=1.5), dict(fresh_share=1.1)):
    with pytest.raises(ValueError):
      consolidate.ConsolidationSchedule(**bad)


def test_ledger_ages_memories_across_cycles_and_restarts(tmp_path):
  path = str(tmp_path / "run" / "memory_ledger.json")
  led = consolidate.Ledger(path)
  np.testing.assert_array_equal(led.observe(_graph(MEMS[:3]), 0), [0, 0, 0])
  np.testing.assert_array_equal(led.observe(_graph(MEMS[:3]), 2), [2, 2, 2])
  led2 = consolidate.Ledger(path)  # a resumed run reads the ledger back
  np.testing.assert_array_equal(led2.observe(_graph(MEMS), 3), [3, 3, 3, 0, 0])
  assert json.load(open(path)) == {"a": 0, "b": 0, "c": 0, "d": 3, "e": 3}
  with open(path, "w") as f:
    f.write("{bad")
  with pytest.raises(ValueError, match="memory_ledger.json: malformed JSON"):
    consolidate.Ledger(path)


def test_walk_seeds_follow_the_schedule():
  g = _graph(MEMS)
  s = consolidate.ConsolidationSchedule(replay_cycles=1, fresh_share=0.8)
  p = s.seed_weights(np.array([5, 5, 5, 0, 5]))  # "d" is new
  w = walk.Walker(g, walk.WalkConfig(length=0, n_walks=1, max_tries=1), np.random.default_rng(0), seed_weights=p)
  counts = collections.Counter(w.seeds()[0] for _ in range(4000))
  assert abs(counts[3] / 4000 - 0.8) < 0.03  # binomial sd 0.0063
  assert abs(counts[0] / 4000 - 0.05) < 0.015


def test_launch_memory_add_and_recall(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  path = str(tmp_path / "m.jsonl")
  run = lambda *a: subprocess.run([sys.executable, "-m", "launch.memory", "--memories", path, *a], cwd=root,
                                  env=env, capture_output=True, text=True, timeout=60)
  assert run("--add", "CI must stay green on main.", "--tags", "ci,git").returncode == 0
  assert run("--add", "The user prefers tabs.", "--tags", "style").returncode == 0
  dup = run("--add", "again", "--id", "m1")
  assert dup.returncode == 2 and "m.jsonl:3: field 'id' 'm1' is already" in dup.stderr
  assert [m.id for m in memory.read_memories(path)] == ["m1", "m2"]
  out = run("--recall", "is main green?", "--k", "2")
  assert out.returncode == 0 and out.stdout.strip() == "- CI must stay green on main."
