"""The dream loop: memory graph I/O, walk statistics, scenarios, scorers, pairing, triplets, a round."""

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import dream as D
from dreamjax import model as M
from dreamjax.data import jsonl
from dreamjax.data.jsonl import DataError
from dreamjax.dream import round as round_lib, scenario


def write_lines(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return str(path)


def mem(i, tags=(), links=(), **kw):
  return D.Memory(id=i, text=f"memory {i}", tags=tuple(tags), links=tuple((l, 1.0) for l in links), **kw)


def chain_graph(n):
  """A path 0 - 1 - ... - n-1 (explicit links only): the hop distance between i and j is |i - j|."""
  return D.build_graph([mem(str(i), links=[str(i + 1)] if i + 1 < n else []) for i in range(n)])


class ByteTokenizer:
  """Bytes shifted past the special ids 0 (pad), 1 (bos), 2 (eos): ids 3..258 < the tiny vocab 263."""

  def encode(self, text):
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------
# Memory graph


def test_edges_from_tags_links_and_embeddings():
  ms = [
      D.Memory("a", "A", tags=("x", "y"), embedding=(1.0, 0.0)),
      D.Memory("b", "B", tags=("x", "y", "z"), links=(("c", 3.0),), embedding=(0.6, 0.8)),  # cos(a, b) = 0.6
      D.Memory("c", "C", tags=("z",), embedding=(0.0, 1.0)),  # cos(a, c) = 0 (< 0.5: no edge), cos(b, c) = 0.8
      D.Memory("d", "D"),  # isolated
  ]
  cfg = D.EdgeConfig(tag_weight=1.0, link_weight=2.0, similarity_weight=10.0, min_similarity=0.5)
  g = D.build_graph(ms, cfg)
  want = {("a", "b"): 2 * 1.0 + 10 * 0.6, ("b", "c"): 1.0 + 2.0 * 3.0 + 10 * 0.8}
  got = {(i, j): w for i, j, w in g.edges()}
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k])
  assert g.weight(1, 0) == pytest.approx(want[("a", "b")]) and g.weight(0, 2) == 0.0
  assert len(g.neighbors[3]) == 0
  assert D.build_graph(ms, D.EdgeConfig(max_tag_nodes=1, similarity_weight=0)).edges() == [("b", "c", 6.0)]


def test_memory_jsonl_round_trip(tmp_path):
  ms = [
      D.Memory("m1", "first", tags=("a", "b"), links=(("m2", 1.0), ("m3", 2.5)), embedding=(0.1, -0.2, 0.3),
               timestamp="2025-01-02T03:04:05", source="chat", meta={"k": [1, 2]}),
      D.Memory("m2", "second", embedding=(1.0, 2.0, 3.0), timestamp=1735787045),
      D.Memory("m3", "third ünïcode", tags=("b",)),
  ]
  path = str(tmp_path / "sub" / "mem.jsonl")
  D.write_memories(path, ms)
  assert D.read_memories(path) == ms
  assert D.load_graph(path).edges() == D.build_graph(ms).edges()
  D.write_memories(path, ms[:1] + [D.Memory("m2", "x"), D.Memory("m3", "y")])  # replaced whole
  assert [m.text for m in D.read_memories(path)] == ["first", "x", "y"]
  assert not [f for f in os.listdir(tmp_path / "sub") if f.endswith(".tmp")]


GOOD_MEM = {"id": "ok", "text": "fine"}


@pytest.mark.parametrize("line,match", [
    ('{"id": "x", "text": ', r":2: malformed JSON"),
    ({"text": "t"}, r":2: missing field 'id'"),
    ({"id": "x", "text": "  "}, r":2: field 'text' is empty"),
    ({"id": "x", "text": "t", "tagz": []}, r":2: unknown field 'tagz'"),
    ({"id": "x", "text": "t", "tags": "a"}, r":2: field 'tags' must be a list"),
    ({"id": "x", "text": "t", "tags": ["a", 3]}, r":2: field 'tags\[1\]' must be a string"),
    ({"id": "x", "text": "t", "links": ["nope"]}, r":2: field 'links\[0\]' names unknown memory 'nope'"),
    ({"id": "x", "text": "t", "links": [{"id": "ok", "weight": 0}]}, r":2: field 'links\[0\]\.weight' must be > 0"),
    ({"id": "x", "text": "t", "links": ["x"]}, r":2: field 'links' links memory 'x' to itself"),
    ({"id": "x", "text": "t", "embedding": [1, "a"]}, r":2: field 'embedding\[1\]' must be a finite number"),
    ({"id": "x", "text": "t", "embedding": [0, 0]}, r":2: field 'embedding' is all zeros"),
    ({"id": "x", "text": "t", "timestamp": "yesterday"}, r":2: field 'timestamp' 'yesterday' is not an ISO"),
    ({"id": "ok", "text": "t"}, r":2: field 'id' 'ok' repeats the memory at .*:1"),
    ([1], r":2: expected a JSON object"),
])
def test_bad_memory_line_names_file_line_field(tmp_path, line, match):
  path = write_lines(tmp_path / "mem.jsonl", [GOOD_MEM, line])
  with pytest.raises(DataError, match=match) as e:
    D.read_memories(path)
  assert str(e.value).startswith(f"{path}:2:")


def test_embedding_sizes_must_agree_and_empty_file(tmp_path):
  path = write_lines(tmp_path / "m.jsonl", [{"id": "a", "text": "t", "embedding": [1, 2]}, "",
                                            {"id": "b", "text": "t", "embedding": [1, 2, 3]}])
  with pytest.raises(DataError, match=rf"{path}:3: field 'embedding' has 3 numbers; .*{path}:1\) has 2"):
    D.read_memories(path)
  with pytest.raises(DataError, match="no memories"):
    D.read_memories(write_lines(tmp_path / "e.jsonl", [""]))
  with pytest.raises(DataError, match="no such file"):
    D.read_memories(str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------------------------------
# Walks


@pytest.mark.parametrize("temperature,restart", [(1.0, 0.0), (0.5, 0.2), (2.5, 0.35)])
def test_transition_frequencies_match_tempered_weights(temperature, restart):
  # Node "0" links to 1, 2, 3 with weights 1, 2, 5; the walk's start "4" is not a neighbour, so a
  # step to "4" can only be a restart.
  link_w = {"1": 1.0, "2": 2.0, "3": 5.0}
  ms = [D.Memory("0", "t", links=tuple(link_w.items())), mem("1"), mem("2"), mem("3"), mem("4", links=["3"])]
  g = D.build_graph(ms, D.EdgeConfig(link_weight=1.0))
  w = D.Walker(g, D.WalkConfig(temperature=temperature, restart_prob=restart), np.random.default_rng(0))
  n = 40_000
  counts = collections.Counter(g.memories[w.step(0, 4)].id for _ in range(n))
  # Independent: p(j) = (1 - r) · w_j^(1/T) / Σ w^(1/T), p(start) = r.
  z = sum(v ** (1 / temperature) for v in link_w.values())
  want = {j: (1 - restart) * v ** (1 / temperature) / z for j, v in link_w.items()}
  want["4"] = restart
  assert set(counts) <= set(want)
  for j, p in want.items():
    assert abs(counts[j] / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (j, counts[j] / n, p)


def test_walk_paths_follow_edges_or_restart():
  g = D.load_graph(D.asset_path("memories.jsonl"))
  w = D.Walker(g, D.WalkConfig(length=30, restart_prob=0.3), np.random.default_rng(1))
  restarts = steps = 0
  for start in range(len(g)):
    path = w.walk(start).path
    assert path[0] == start and len(path) == 31
    for a, b in zip(path, path[1:]):
      assert g.weight(a, b) > 0 or b == start
      restarts += b == start and g.weight(a, b) == 0
      steps += 1
  assert restarts > 0.1 * steps  # restarts happen (0.3 of steps, minus those that land on start anyway)


def test_walks_reproducible_from_seed():
  g = D.load_graph(D.asset_path("memories.jsonl"))

  def run(seed):
    w = D.Walker(g, D.WalkConfig(), np.random.default_rng(seed))
    return [w.draw() for _ in range(8)]

  assert run(7) == run(7)
  assert run(7) != run(8)


def test_collision_seeds_respect_min_distance():
  n, min_d = 12, 4
  g = chain_graph(n)
  w = D.Walker(g, D.WalkConfig(n_walks=3, min_distance=min_d, length=2), np.random.default_rng(0))
  seed_sets = set()
  for _ in range(40):
    seeds = [wk.start for wk in w.draw().walks]
    assert len(seeds) == 3
    for a in seeds:
      for b in seeds:
        if a != b:
          assert abs(a - b) >= min_d  # on a chain the hop distance is |i - j|
    seed_sets.add(frozenset(seeds))
  assert len(seed_sets) > 5
  assert [int(d) for d in D.bfs_distances(g, 3)] == [abs(i - 3) for i in range(n)]
  with pytest.raises(D.NoNewWalk, match="no new node set"):
    D.Walker(g, D.WalkConfig(n_walks=2, min_distance=n, max_tries=5), np.random.default_rng(0)).draw()


def test_disconnected_memories_are_far_apart():
  g = D.build_graph([mem("a", links=["b"]), mem("b"), mem("c")])  # c is alone
  assert D.bfs_distances(g, 0).tolist() == [0, 1, -1]
  w = D.Walker(g, D.WalkConfig(n_walks=2, min_distance=2, length=0), np.random.default_rng(0))
  for _ in range(2):
    assert 2 in w.draw().node_set  # every collision pairs c with a or b


def test_no_repeated_node_sets_until_exhausted():
  g = chain_graph(4)  # length-1 walks from one seed: node sets {i}, {i, i±1}: 3 + ... finite
  seen = {frozenset({"0"})}
  w = D.Walker(g, D.WalkConfig(n_walks=1, length=1, restart_prob=0.5), np.random.default_rng(0), seen=seen)
  drawn = []
  with pytest.raises(D.NoNewWalk):
    for _ in range(100):
      drawn.append(w.draw().node_set)
  want = {frozenset(s) for s in ({1}, {2}, {3}, {0, 1}, {1, 2}, {2, 3})}
  assert len(drawn) == len(set(drawn)) and set(drawn) == want
  assert frozenset({"0"}) in seen and len(seen) == 7  # the caller's set is kept up to date


def test_coverage_on_a_hand_checked_graph():
  ms = [mem("a", tags=["x"]), mem("b", tags=["x", "y"]), mem("c", tags=["z"]), mem("d"), mem("e", tags=["w"])]
  g = D.build_graph(ms)
  cov = D.coverage(g, [0, 1, 1])
  assert (cov.nodes_visited, cov.nodes_total, cov.tags_visited, cov.tags_total) == (2, 5, 2, 4)
  assert cov.node_fraction == 0.4 and cov.tag_fraction == 0.5
  w = D.Walker(g, D.WalkConfig(n_walks=1, length=0), np.random.default_rng(0),
               seed_weights=np.array([0, 0, 1, 1, 0.0]))  # only c and d can be seeds
  w.draw(), w.draw()
  assert w.coverage() == D.Coverage(2, 5, 1, 4)
  assert w.visited.tolist() == [0, 0, 1, 1, 0]


# --------------------------------------------------------------------------------------------------
# Scenarios


TEMPLATES = [
    {"id": "p", "kind": "accept", "format": "plain", "memory_format": "* {text} [{id}]",
     "prompt": "Notes:\n{memories}\nTags: {tags}\nA: {walk_1} B: {walk_2}\n>"},
    {"id": "c", "kind": "push_back", "format": "chat", "target": "No: {tags}",
     "messages": [{"role": "system", "content": "Know {{this}}:\n{memories}"}, {"role": "user", "content": "Do it."}]},
]


def test_template_rendering_plain_and_chat(tmp_path):
  templates = D.read_templates(write_lines(tmp_path / "t.jsonl", TEMPLATES))
  assert [t.walks_needed for t in templates] == [2, 1]
  g = D.build_graph([mem("a", tags=["x"]), mem("b", tags=["y", "x"]), mem("c")])
  col = D.Collision((D.Walk(0, (0, 1, 0)), D.Walk(2, (2,))))
  sc = D.render(templates[0], g, col)
  assert sc.prompt == ("Notes:\n* memory a [a]\n* memory b [b]\n* memory c [c]\nTags: x, y\n"
                       "A: * memory a [a]\n* memory b [b] B: * memory c [c]\n>")
  assert sc.node_ids == ("a", "b", "c") and sc.walks == (("a", "b", "a"), ("c",)) and sc.kind == "accept"
  assert sc.id == scenario.scenario_id("p", "accept", ("a", "b", "c")) and len(sc.id) == 16
  chat = D.render(templates[1], g, D.Collision((D.Walk(1, (1,)),)))
  assert chat.prompt == [{"role": "system", "content": "Know {this}:\n- memory b"},
                         {"role": "user", "content": "Do it."}]
  assert chat.target == "No: x, y"
  assert D.render_chatml(chat.prompt) == ("<|im_start|>system\nKnow {this}:\n- memory b<|im_end|>\n"
                                          "<|im_start|>user\nDo it.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("line,match", [
    ({"id": "x", "kind": "k", "format": "plain", "prompt": "{memory}"},
     r"field 'prompt' has unknown placeholder \{memory\}"),
    ({"id": "x", "kind": "k", "format": "plain", "prompt": "{memories"}, r"field 'prompt' is not a valid template"),
    ({"id": "x", "kind": "k", "format": "xml", "prompt": "p"}, r"field 'format' is 'xml'"),
    ({"id": "x", "kind": "k", "format": "plain", "messages": []}, r"field 'messages' belongs to format 'chat'"),
    ({"id": "x", "kind": "k", "format": "chat", "messages": [{"role": "assistant", "content": "hi"}]},
     r"field 'messages\[0\]\.role' must be 'user'"),
    ({"id": "x", "kind": "k", "format": "chat", "messages": [{"role": "robot", "content": "hi"}]},
     r"field 'messages\[0\]\.role' is 'robot'"),
    ({"id": "x", "kind": "", "format": "plain", "prompt": "p"}, r"field 'kind' must be a non-empty string"),
    ({"id": "x", "kind": "k", "format": "plain", "prompt": "p", "memory_format": "{memories}"},
     r"field 'memory_format' has unknown placeholder"),
    ({"id": "p", "kind": "k", "format": "plain", "prompt": "p"}, r"field 'id' 'p' repeats the template at .*:1"),
])
def test_bad_template_line_names_file_line_field(tmp_path, line, match):
  path = write_lines(tmp_path / "t.jsonl", [TEMPLATES[0], line])
  with pytest.raises(DataError, match=match) as e:
    D.read_templates(path)
  assert str(e.value).startswith(f"{path}:2:")


def test_plan_balances_kinds_and_checks_walks(tmp_path):
  templates = D.read_templates(write_lines(tmp_path / "t.jsonl", TEMPLATES))
  g = D.load_graph(D.asset_path("memories.jsonl"))
  w = D.Walker(g, D.WalkConfig(n_walks=2, min_distance=2), np.random.default_rng(0))
  plan, exhausted = D.plan_scenarios(w, templates, 9, kind_shares={"accept": 2, "push_back": 1})
  assert not exhausted and collections.Counter(s.kind for s in plan) == {"accept": 6, "push_back": 3}
  assert len({frozenset(s.node_ids) for s in plan}) == 9
  with pytest.raises(ValueError, match=r"uses \{walk_2\} but WalkConfig.n_walks is 1"):
    D.plan_scenarios(D.Walker(g, D.WalkConfig(n_walks=1), np.random.default_rng(0)), templates, 2)
  with pytest.raises(ValueError, match="kind_shares names kind 'other'"):
    D.plan_scenarios(w, templates, 2, kind_shares={"other": 1.0})


def test_shipped_assets_load():
  g = D.load_graph(D.asset_path("memories.jsonl"))
  templates = D.read_templates(D.asset_path("templates.jsonl"))
  rules = D.RuleScorer.from_file(D.asset_path("rules.jsonl"))
  assert len(g) >= 20 and {t.kind for t in templates} == {"accept", "push_back"} and rules.rules
  # The default collision spacing is reachable in the shipped graph.
  assert max(int(D.bfs_distances(g, i).max()) for i in range(len(g))) >= D.WalkConfig().min_distance


# --------------------------------------------------------------------------------------------------
# Scorers


def sc_of(kind, prompt="p", target=None):
  return D.Scenario(id=f"id-{kind}", kind=kind, template_id="t", prompt=prompt, node_ids=("a",), walks=(("a",),),
                    target=target)


RULES = [
    {"name": "agree", "keywords": ["ok", "will do"], "weight": 1, "kinds": ["accept"]},
    {"name": "hedge", "pattern": r"\bhowever\b", "weight": -2, "kinds": ["accept"]},
    {"name": "concern", "pattern": "RISK", "weight": 1.5, "case_sensitive": True},
]


def test_rule_scorer_on_known_strings(tmp_path):
  rs = D.RuleScorer.from_file(write_lines(tmp_path / "r.jsonl", RULES))
  assert rs.score(sc_of("accept"), "OK, will do.") == (1.0, "agree(+1)")
  assert rs.score(sc_of("accept"), "Ok. However, RISK.").value == 1 - 2 + 1.5
  assert rs.score(sc_of("accept"), "tokens broken").value == 0.0  # 'ok' only as a whole word
  assert rs.score(sc_of("push_back"), "ok, however").value == 0.0  # accept-only rules skipped
  assert rs.score(sc_of("push_back"), "a risk and a RISK").value == 1.5
  assert rs.score(sc_of("push_back"), "nothing").reason == "no rule matched"


@pytest.mark.parametrize("line,match", [
    ({"name": "x", "pattern": "(", "weight": 1}, r"field 'pattern' is not a valid regex"),
    ({"name": "x", "pattern": "a", "keywords": ["b"], "weight": 1}, r"exactly one of fields 'pattern'"),
    ({"name": "x", "keywords": ["b", ""], "weight": 1}, r"field 'keywords\[1\]' must be a non-empty string"),
    ({"name": "x", "pattern": "a", "weight": "1"}, r"field 'weight' must be a finite number"),
    ({"name": "x", "pattern": "a", "weight": 1, "kinds": "accept"}, r"field 'kinds' must be a non-empty list"),
    ({"name": "x", "pattern": "a"}, r"missing field 'weight'"),
    ({"name": "agree", "pattern": "a", "weight": 1}, r"field 'name' 'agree' repeats the rule at .*:1"),
])
def test_bad_rule_line_names_file_line_field(tmp_path, line, match):
  path = write_lines(tmp_path / "r.jsonl", [RULES[0], line])
  with pytest.raises(DataError, match=match) as e:
    D.RuleScorer.from_file(path)
  assert str(e.value).startswith(f"{path}:2:")


GRADER = """
import json, sys
for line in sys.stdin:
  item = json.loads(line)
  mode = sys.argv[1]
  if mode == "ok":
    print(json.dumps({"score": len(item["response"]), "reason": item["kind"] + ":" + ",".join(item["node_ids"])}))
  elif mode == "number":
    print(len(item["response"]) / 2)
  elif mode == "bad":
    print("score=3")
  elif mode == "missing":
    print(json.dumps({"value": 3}))
  elif mode == "short":
    pass
  elif mode == "fail":
    sys.exit("grader exploded")
  elif mode == "slow":
    import time; time.sleep(30)
"""


@pytest.fixture
def grader(tmp_path):
  path = tmp_path / "grader.py"
  path.write_text(GRADER)
  return lambda mode, **kw: D.CommandScorer([sys.executable, str(path), mode], **kw)


def test_command_scorer(grader):
  items = [(sc_of("accept"), "abc"), (sc_of("push_back"), "héllo"), (sc_of("accept"), "")]
  assert D.score_all(grader("ok", batch_size=2), items) == [(3.0, "accept:a"), (5.0, "push_back:a"), (0.0, "accept:a")]
  assert grader("number").score(*items[1]) == (2.5, "")


@pytest.mark.parametrize("mode,match", [
    ("bad", r"output line 1: malformed JSON"),
    ("missing", r"output line 1: missing field 'score'"),
    ("short", r"wrote 0 output lines for 1 input lines"),
    ("fail", r"exited with status 1; stderr: 'grader exploded'"),
])
def test_command_scorer_errors(grader, mode, match):
  with pytest.raises(D.ScorerError, match=match) as e:
    grader(mode).score(sc_of("accept"), "x")
  assert "grader.py" in str(e.value)


def test_command_scorer_timeout(grader):
  with pytest.raises(D.ScorerError, match=r"no answer within 0.5 s"):
    grader("slow", timeout=0.5).score(sc_of("accept"), "x")


def test_score_all_rejects_non_scores():
  class Bad:
    def score(self, scenario, response):
      return float("nan")
  with pytest.raises(D.ScorerError, match="Bad: score must be a finite number"):
    D.score_all(Bad(), [(sc_of("accept"), "x")])


@functools.lru_cache(maxsize=None)
def tiny_model():
  cfg = M.ModelConfig.preset("qwen3-tiny")
  return cfg, M.init_params(cfg, jax.random.PRNGKey(0), std=0.3)


def test_model_judge_matches_an_unbatched_forward():
  cfg, params = tiny_model()
  tok = ByteTokenizer()
  judge = D.ModelJudgeScorer(params, cfg, tok, template="{prompt}|{response}|{kind}?", yes=" y", no=" nope",
                             batch_size=2, pad_multiple=16)
  items = [(sc_of("accept", prompt="short"), "fine"), (sc_of("push_back", prompt="a much longer prompt " * 3), "no"),
           (sc_of("accept", prompt=[{"role": "user", "content": "hi"}]), "yo")]
  got = judge.score_batch(items)

  fwd = jax.jit(functools.partial(M.forward, config=cfg))

  def logp(ctx, cont, width=96):
    # The independent path: one sequence at the start of a fixed buffer, no mask (the later filler
    # tokens are invisible to earlier ones by causality), log-softmax by hand in float64.
    seq = jnp.zeros((1, width), jnp.int32).at[0, :len(ctx) + len(cont)].set(jnp.asarray(ctx + cont))
    logits = np.asarray(fwd(params, seq, jnp.arange(width)[None], jnp.ones_like(seq))[0][0], np.float64)
    top = logits.max(-1, keepdims=True)
    lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(lp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))

  for (sc, resp), s in zip(items, got):
    ctx = tok.encode(f"{scenario.prompt_text(sc.prompt)}|{resp}|{sc.kind}?")
    want = logp(ctx, tok.encode(" y")) - logp(ctx, tok.encode(" nope"))
    assert s.value == pytest.approx(want, abs=2e-4)
  assert got[0].value != got[1].value


def test_sample_answers_with_the_fixture_tokenizer():
  from dreamjax.model.hf import load_tokenizer

  tok = load_tokenizer(os.path.join(os.path.dirname(__file__), "fixtures", "qwen3_tiny"))
  assert scenario.encode(tok, "the plan") == tok.encode("the plan").ids
  cfg, params = tiny_model()
  prompts = ["the plan is wrong", [{"role": "user", "content": "ship it"}]]
  dream = dataclasses.replace(DREAM, prompt_bucket=96)  # the width of the other rounds: no recompile
  answers, truncated = D.sample_answers(params, cfg, tok, prompts, dream, jax.random.PRNGKey(0))
  assert truncated == 0 and [[t for t, _ in a] for a in answers] == [[0.1, 0.1, 0.8, 0.8]] * 2
  assert all(isinstance(text, str) for a in answers for _, text in a)


# --------------------------------------------------------------------------------------------------
# Pairing and the kind balance


def R(text, score, t=0.8):
  return D.Response(text, t, D.Score(score))


def test_make_pair_best_vs_worst_and_margin_filter():
  sc = sc_of("accept")
  pair = D.make_pair(sc, [R("a", 1.0, 0.1), R("b", 3.0), R("   ", -9.0), R("c", 0.5, 0.1)])
  assert (pair.chosen.text, pair.rejected.text, pair.margin) == ("b", "c", 2.5)  # the blank answer is left out
  assert pair.rejected.temperature == 0.1 and len(pair.all_scores) == 4
  assert D.make_pair(sc, [R("same", 1.0), R("same", 0.0)]) is None  # no distinct rejected answer
  assert D.make_pair(sc, [R("", 1.0), R("x", 0.0)]) is None
  target = D.Response("the target", None, D.Score(5.0))
  pair = D.make_pair(sc, [R("a", 4.0), R("the target", -1.0), R("b", 4.5)], target)
  assert (pair.chosen.text, pair.rejected.text, pair.margin) == ("the target", "a", 1.0)


def test_kind_share_warning(caplog):
  with caplog.at_level(logging.WARNING):
    assert D.kind_share_warnings({"accept": 8, "push_back": 2}, ["accept", "push_back"], 0.2, "round") == []
    ws = D.kind_share_warnings({"accept": 9, "push_back": 1}, ["accept", "push_back"], 0.2, "round")
  assert len(ws) == 1 and "kind 'push_back' has 1 of 10 (10%)" in ws[0]
  assert [r.getMessage() for r in caplog.records] == ws
  assert "none" in D.kind_share_warnings({}, ["accept"], 0.2, "round")[0]


def test_next_kind_tracks_target_shares():
  counts = collections.Counter()
  for _ in range(20):
    counts[round_lib.next_kind(["a", "b", "c"], [0.5, 0.3, 0.2], counts)] += 1
  assert counts == {"a": 10, "b": 6, "c": 4}


# --------------------------------------------------------------------------------------------------
# The triplets file


def record(i, kind="accept", seed=0):
  return {"prompt": f"p{i}", "chosen": "c", "rejected": "r", "id": f"s{i}", "kind": kind,
          "provenance": {"node_ids": [f"n{i}", "m"], "seed": seed}}


def test_triplets_append_only_and_resume(tmp_path):
  path = str(tmp_path / "t" / "triplets.jsonl")
  with D.TripletWriter(path) as w:
    assert w.append(record(0)) and w.append(record(1, "push_back"))
    assert not w.append(record(0))  # same id: refused
  before = open(path, "rb").read()
  with D.TripletWriter(path) as w:
    assert w.ids == {"s0", "s1"} and w.kind_counts == {"accept": 1, "push_back": 1} and w.lines == 2
    assert w.node_sets == {frozenset({"n0", "m"}): 0, frozenset({"n1", "m"}): 0}
    assert not w.append(record(1)) and w.append(record(2))
  after = open(path, "rb").read()
  assert after.startswith(before) and after.count(b"\n") == 3
  assert [e.prompt for e in jsonl.read_preferences(path)] == ["p0", "p1", "p2"]
  with pytest.raises(DataError, match=r"field 'chosen' is empty"):
    D.TripletWriter(path).append({**record(9), "chosen": " "})


def test_truncated_last_line_is_reported_and_moved_aside(tmp_path, caplog):
  path = tmp_path / "triplets.jsonl"
  whole = json.dumps(record(0)) + "\n" + json.dumps(record(1)) + "\n"
  torn = json.dumps(record(2))[:25]
  path.write_bytes((whole + torn).encode())
  with pytest.raises(DataError, match=rf"{path}:3: truncated last line \(25 bytes"):
    D.TripletWriter(str(path), repair_torn=False)
  assert path.read_bytes() == (whole + torn).encode()  # untouched when not repairing
  with caplog.at_level(logging.WARNING):
    w = D.TripletWriter(str(path))
  assert w.torn == 25 and w.ids == {"s0", "s1"}
  assert any(f"{path}:3: truncated last line (25 bytes)" in r.getMessage() for r in caplog.records)
  assert (tmp_path / "triplets.jsonl.torn").read_text() == torn + "\n"
  w.append(record(2))
  w.close()
  assert path.read_text() == whole + json.dumps(record(2)) + "\n"
  # A whole record that lost only its newline is kept.
  path.write_text(whole + json.dumps(record(3)))
  assert D.TripletWriter(str(path)).ids == {"s0", "s1", "s3"}
  assert path.read_text() == whole + json.dumps(record(3)) + "\n"


def test_bad_middle_line_in_triplets_is_an_error(tmp_path):
  path = write_lines(tmp_path / "t.jsonl", [record(0), "{oops", record(1)])
  with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
    D.TripletWriter(path)
  path = write_lines(tmp_path / "u.jsonl", [record(0), {"prompt": "p", "chosen": "c", "rejected": "r"}])
  with pytest.raises(DataError, match=rf"{path}:2: missing field 'id'"):
    D.TripletWriter(path)
  path = write_lines(tmp_path / "v.jsonl", [record(0), record(0)])
  with pytest.raises(DataError, match=rf"{path}:2: field 'id' 's0' is already on an earlier line"):
    D.TripletWriter(path)


# --------------------------------------------------------------------------------------------------
# A whole round on the tiny model


class DistinctChars:
  """Score = number of distinct characters: answers differ, so pairs have margins."""

  def score(self, scenario, response):
    return float(len(set(response)))


DREAM = D.DreamConfig(max_new_tokens=10, max_prompt_tokens=96, batch_size=8, prompt_bucket=32, min_margin=1.0)


def assets():
  return D.load_graph(D.asset_path("memories.jsonl")), D.read_templates(D.asset_path("templates.jsonl"))


def test_dream_round_writes_valid_trl_triplets_and_resumes(tmp_path):
  cfg, params = tiny_model()
  graph, templates = assets()
  path = str(tmp_path / "triplets" / "dream.jsonl")
  run = lambda seed, **kw: D.dream_round(params, cfg, ByteTokenizer(), graph, templates, DistinctChars(),
                                         n_scenarios=6, seed=seed, out_path=path, model_step=7, dream=DREAM, **kw)
  st = run(1)
  assert st.scenarios == 6 and st.scenarios_per_kind == {"accept": 3, "push_back": 3}
  assert st.answers == 6 * 4 and st.prompts_truncated == 6
  assert st.kept + st.dropped_margin + st.dropped_no_pair == 6 and st.kept >= 4
  examples = jsonl.read_preferences(path)
  lines = [json.loads(l) for l in open(path)]
  assert len(examples) == len(lines) == st.kept
  assert len({l["id"] for l in lines}) == st.kept
  for l in lines:
    p = l["provenance"]
    assert p["seed"] == 1 and p["model_step"] == 7 and p["node_ids"] and len(p["walks"]) == 2
    assert set(p["node_ids"]) == {n for w in p["walks"] for n in w}
    assert p["scores"]["margin"] >= 1.0 and p["scores"]["chosen"] == max(s for _, s in p["scores"]["all"])
    assert {p["temperatures"]["chosen"], p["temperatures"]["rejected"]} <= {0.1, 0.8}
    assert sorted(t for t, _ in p["scores"]["all"]) == [0.1, 0.1, 0.8, 0.8]
    assert isinstance(l["prompt"], list) == isinstance(l["chosen"], list)
  assert st.coverage["nodes_visited"] > 0 and 0 < st.run_coverage["node_fraction"] <= 1
  full = open(path, "rb").read()

  # Kill mid-round: two whole lines and half of the third survive. The resumed round keeps
  # those bytes, sets the torn half aside, skips the written scenarios and duplicates nothing.
  keep = b"".join(full.splitlines(keepends=True)[:2])
  torn = full.splitlines(keepends=True)[2][:40]
  with open(path, "wb") as f:
    f.write(keep + torn)
  st2 = run(1)
  assert st2.torn_bytes == 40 and st2.skipped_existing == 2 and st2.scenarios == 6
  resumed = open(path, "rb").read()
  assert resumed.startswith(keep)
  ids = [json.loads(l)["id"] for l in resumed.splitlines()]
  first = [json.loads(l)["id"] for l in full.splitlines()]
  plan, _ = D.plan_scenarios(D.Walker(graph, DREAM.walk, np.random.default_rng(1)), templates, 6)
  assert len(ids) == len(set(ids)) and ids[:2] == first[:2]
  assert set(first) <= {s.id for s in plan} and set(ids) <= {s.id for s in plan}
  assert open(path + ".torn", "rb").read() == torn + b"\n"

  # Another round (a new seed) never repeats a written node set, and reports the run's totals.
  st3 = run(2)
  lines = [json.loads(l) for l in open(path)]
  node_sets = [frozenset(l["provenance"]["node_ids"]) for l in lines]
  assert len(node_sets) == len(set(node_sets))
  assert sum(st3.run_kept_per_kind.values()) == len(lines) == len(jsonl.read_preferences(path))


def test_dream_round_with_rules_and_targets_counts_every_scenario(tmp_path, caplog):
  cfg, params = tiny_model()
  graph, _ = assets()
  templates = D.read_templates(write_lines(tmp_path / "t.jsonl", [
      {"id": "a", "kind": "accept", "format": "plain", "prompt": "{memories}\nGo.", "target": "OK, will do."},
      {"id": "b", "kind": "push_back", "format": "plain", "prompt": "{walk_1}\n{walk_2}\nShip it."},
  ]))
  rules = D.RuleScorer.from_file(write_lines(tmp_path / "r.jsonl", RULES))
  with caplog.at_level(logging.WARNING):
    st = D.dream_round(params, cfg, ByteTokenizer(), graph, templates, rules, n_scenarios=4, seed=3,
                       out_path=str(tmp_path / "d.jsonl"), model_step=0, dream=DREAM)
  # The accept scenarios have a target scoring +1 against random bytes scoring 0: all kept. The
  # push_back answers all score 0: no margin, nothing kept, and the imbalance is reported.
  assert st.kept_per_kind == {"accept": 2} and st.dropped_margin + st.dropped_no_pair == 2
  assert any("kind 'push_back' has 0 of 2" in w for w in st.warnings)
  assert any("kind 'push_back'" in r.getMessage() for r in caplog.records)
  for l in open(tmp_path / "d.jsonl"):
    l = json.loads(l)
    assert l["chosen"] == "OK, will do." and l["provenance"]["chosen_is_target"]
    assert l["provenance"]["temperatures"]["chosen"] is None


class TargetWins:
  """The template's target scores 10, any model answer 0: every scenario with an answer is kept."""

  def score(self, scenario, response):
    return 10.0 if response == scenario.target else 0.0


def test_rounds_never_repeat_a_written_node_set(tmp_path):
  cfg, params = tiny_model()
  graph = chain_graph(6)  # one-node walks: only 6 node sets exist
  templates = D.read_templates(write_lines(tmp_path / "t.jsonl", [
      {"id": "a", "kind": "accept", "format": "plain", "prompt": "{memories}\nGo.", "target": "OK."}]))
  # prompt_bucket 96: the same padded width as the other rounds, so generate does not recompile.
  dream = dataclasses.replace(DREAM, walk=D.WalkConfig(n_walks=1, length=0), prompt_bucket=96)
  path = str(tmp_path / "d.jsonl")
  run = lambda seed, n: D.dream_round(params, cfg, ByteTokenizer(), graph, templates, TargetWins(), n_scenarios=n,
                                      seed=seed, out_path=path, model_step=0, dream=dream)
  assert run(1, 3).kept == 3 and run(2, 3).kept == 3
  node_sets = [tuple(json.loads(l)["provenance"]["node_ids"]) for l in open(path)]
  assert sorted(node_sets) == [(str(i),) for i in range(6)]
  st = run(3, 1)
  assert st.exhausted and st.scenarios == 0 and st.run_coverage["node_fraction"] == 1.0
  assert run(1, 3).skipped_existing == 3  # re-running a round finds its own scenarios written
