"""The dream loop: memory graph → random-walk scenarios → on-policy answers → scorer → triplets.

The two-stage memory: `recall` (fast: new memories enter the file and are retrieved into prompts
at once) and `consolidate` (slow: a schedule replays fresh memories, interleaved with older ones,
through the dream cycles that train them into the weights).

`dream_round` runs one round; the launcher alternates rounds with small training cycles. The
example assets (a memory graph, templates and rules) ship under `dreamjax/assets/dream/`;
`asset_path(name)` finds them.
"""

import importlib.resources

from dreamjax.dream.consolidate import ConsolidationSchedule, Ledger
from dreamjax.dream.round import (DreamConfig, DreamStats, Pair, Response, TripletWriter, dream_round,
                                 kind_share_warnings, make_pair, plan_scenarios, sample_answers, triplet_record)
from dreamjax.dream.memory import (EdgeConfig, Memory, MemoryGraph, build_graph, load_graph, read_memories,
                                   write_memories)
from dreamjax.dream.recall import Recall, append_memory, memory_block, with_memories
from dreamjax.dream.scenario import Scenario, Template, read_templates, render, render_chatml
from dreamjax.dream.scorer import (CommandScorer, ModelJudgeScorer, Rule, RuleScorer, Score, Scorer, ScorerError,
                                   score_all)
from dreamjax.dream.walk import Collision, Coverage, NoNewWalk, Walk, WalkConfig, Walker, bfs_distances, coverage


def asset_path(name: str) -> str:
  """Returns the path of a shipped example file: 'memories.jsonl', 'templates.jsonl' or 'rules.jsonl'."""
  path = importlib.resources.files("dreamjax") / "assets" / "dream" / name
  if not path.is_file():
    raise FileNotFoundError(f"no shipped dream asset {name!r} (expected {path})")
  return str(path)
