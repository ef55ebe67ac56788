"""The fast stage of the two-stage memory from the shell: add an experience, recall memories for a prompt.

    python -m launch.memory --memories mem.jsonl --add "CI must stay green on main." --tags ci,git
    python -m launch.memory --memories mem.jsonl --recall "Can I force-push to main?" --k 3

--add appends one memory (validated; the file is never rewritten; the id defaults to m<N+1>);
a running `launch.dream` picks it up at its next cycle and replays it by the consolidation
schedule. --recall prints the k most relevant memories as the block a prompt would get
(`dreamjax.dream.recall`).
"""

import datetime
import json
import os
import sys

from absl import app, flags

from dreamjax.data.jsonl import DataError
from dreamjax.dream import memory, recall

_MEMORIES = flags.DEFINE_string("memories", None, "Memory graph JSONL (created by --add if missing).", required=True)
_ADD = flags.DEFINE_string("add", None, "Text of a memory to append.")
_ID = flags.DEFINE_string("id", None, "Id of the added memory (default m<count + 1>).")
_TAGS = flags.DEFINE_list("tags", [], "Tags of the added memory.")
_SOURCE = flags.DEFINE_string("source", "launch.memory", "Source of the added memory.")
_RECALL = flags.DEFINE_string("recall", None, "Query: print the memories most relevant to it.")
_K = flags.DEFINE_integer("k", 3, "Memories to recall.", lower_bound=1)
_FORMAT = flags.DEFINE_string("memory_format", "- {text}", "How one recalled memory is written.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_ADD.value is None) == (_RECALL.value is None):
    raise app.UsageError("give exactly one of --add TEXT or --recall QUERY")
  path = _MEMORIES.value
  try:
    if _ADD.value is not None:
      existing = memory.read_memories(path) if os.path.exists(path) and os.path.getsize(path) else []
      mem_id = _ID.value or f"m{len(existing) + 1}"
      stamp = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
      mem = memory.Memory(mem_id, _ADD.value, tags=tuple(_TAGS.value), timestamp=stamp, source=_SOURCE.value)
      recall.append_memory(path, mem)
      print(json.dumps(mem.to_json(), ensure_ascii=False))
    else:
      if not os.path.exists(path):
        raise DataError(f"--memories: {path!r} does not exist")
      hits = recall.Recall(memory.load_graph(path)).top(_RECALL.value, _K.value)
      print(recall.memory_block((m for m, _ in hits), _FORMAT.value))
  except (DataError, KeyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
