"""JSONL validation (file, line, field in every error) and the replay mixer."""

import json

import pytest

from dreamjax.data import jsonl, mix


def write_lines(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return str(path)


GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
CHAT = {
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "hello"}],
    "rejected": [{"role": "assistant", "content": "go away"}],
}


def test_reads_string_and_chat_formats(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", [GOOD, "", CHAT])
  ex = jsonl.read_preferences(path)
  assert [e.chosen for e in ex] == ["yes", CHAT["chosen"]]
  assert ex[1].source == f"{path}:3"


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"prompt": "p", "chosen": "y", ', r":2: malformed JSON at column"),
        ({"prompt": "p", "chosen": "y"}, r":2: missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "n"}, r":2: field 'chosen' must be a string or a list"),
        ({"prompt": "p", "chosen": "", "rejected": "n"}, r":2: field 'chosen' is empty"),
        ({"prompt": [{"role": "user"}], "chosen": "y", "rejected": "n"}, r":2: field 'prompt\[0\]' is missing 'content'"),
        ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "y", "rejected": "n"}, r"prompt\[0\]\.role"),
        ({"prompt": "p", "chosen": "y", "rejected": [{"role": "assistant", "content": "n"}]}, r"both be strings"),
        ([1, 2], r":2: expected a JSON object"),
    ],
)
def test_bad_line_names_file_line_field(tmp_path, line, match):
  path = write_lines(tmp_path / "bad.jsonl", [GOOD, line])
  with pytest.raises(jsonl.DataError, match=match) as e:
    jsonl.read_preferences(path)
  assert str(tmp_path / "bad.jsonl") in str(e.value)


def test_skip_bad_lines_records_and_counts(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", [GOOD, "{nope", {"prompt": "p"}, GOOD])
  record = tmp_path / "bad_lines.txt"
  bad = jsonl.BadLines()
  ex = jsonl.read_preferences(path, skip_bad_lines=True, bad_lines_file=str(record), bad=bad)
  assert len(ex) == 2 and bad.count == 2
  lines = record.read_text().splitlines()
  assert lines[0].startswith(f"{path}:2:") and lines[1].startswith(f"{path}:3: missing field 'chosen'")


def test_empty_and_missing_files(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(jsonl.DataError, match="empty.jsonl: no valid examples"):
    jsonl.read_preferences(str(tmp_path / "empty.jsonl"))
  with pytest.raises(jsonl.DataError, match="no such file"):
    jsonl.read_texts(str(tmp_path / "missing.jsonl"))


def test_texts(tmp_path):
  path = write_lines(tmp_path / "g.jsonl", [{"text": "a b"}, {"text": "c"}])
  assert [t.text for t in jsonl.read_texts(path)] == ["a b", "c"]
  path = write_lines(tmp_path / "g2.jsonl", [{"text": 5}])
  with pytest.raises(jsonl.DataError, match=r"g2.jsonl:1: field 'text' must be a string, got int"):
    jsonl.read_texts(path)


# ---------------------------------------------------------------------------------------------


def test_mixer_ratio_one_pass_no_repeat():
  pref, gen = list(range(37)), [f"g{i}" for i in range(5)]
  m = mix.Mixer(pref, gen, batch_size=8, general_ratio=0.25, seed=3)
  batches = list(m)
  assert all(len(b.general) == 2 for b in batches)
  seen = [x for b in batches for x in b.preference]
  assert sorted(seen) == pref  # every preference example exactly once: one pass, never repeat
  assert len(batches) == m.batches_per_epoch() == 7  # ceil(37 / 6)
  # General data cycles in fresh orders: each full cycle covers all 5.
  gseq = [g for b in batches for g in b.general]
  assert sorted(gseq[:5]) == sorted(gen) and sorted(gseq[5:10]) == sorted(gen)


def test_mixer_epochs_reshuffle():
  m = mix.Mixer(list(range(12)), batch_size=4, general_ratio=0.0, epochs=2, seed=0)
  seq = [x for b in m for x in b.preference]
  assert len(seq) == 24 and sorted(seq[:12]) == sorted(seq[12:]) == list(range(12))
  assert seq[:12] != seq[12:]


def test_mixer_resume_from_position_is_exact():
  pref, gen = list(range(29)), list(range(100, 107))
  full = [(b.preference, b.general) for b in mix.Mixer(pref, gen, batch_size=5, general_ratio=0.4, seed=9)]
  m = mix.Mixer(pref, gen, batch_size=5, general_ratio=0.4, seed=9)
  first = [next(m) for _ in range(3)]
  saved = mix.MixerPosition.from_dict(json.loads(json.dumps(first[-1].position.to_dict())))
  resumed = mix.Mixer(pref, gen, batch_size=5, general_ratio=0.4, seed=9, position=saved)
  rest = [(b.preference, b.general) for b in resumed]
  assert [(b.preference, b.general) for b in first] + rest == full


def test_mixer_rejects_bad_config():
  with pytest.raises(ValueError, match="general_ratio"):
    mix.Mixer([1], batch_size=4, general_ratio=1.0)
  with pytest.raises(ValueError, match="rounds to 0"):
    mix.Mixer([1], ["g"], batch_size=1, general_ratio=0.25)


def test_encodings_bom_gzip_and_bytes_that_are_not_utf8(tmp_path):
  good = "".join(json.dumps(x) + "\n" for x in (GOOD, CHAT)).encode("utf-8")
  (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good)  # what some Windows editors write
  assert [e.chosen for e in jsonl.read_preferences(str(tmp_path / "bom.jsonl"))] == ["yes", CHAT["chosen"]]
  import gzip  # pylint: disable=g-import-not-at-top

  (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(good))
  ex = jsonl.read_preferences(str(tmp_path / "d.jsonl.gz"))
  assert [e.chosen for e in ex] == ["yes", CHAT["chosen"]] and ex[1].source.endswith("d.jsonl.gz:2")
  (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(good * 50)[:-30])  # truncated download
  with pytest.raises(jsonl.DataError, match=r"cut\.jsonl\.gz: gzip-compressed, but its data cannot be decompressed"):
    jsonl.read_preferences(str(tmp_path / "cut.jsonl.gz"))
  latin1 = json.dumps({"prompt": "café", "chosen": "y", "rejected": "n"}, ensure_ascii=False).encode("latin-1")
  (tmp_path / "latin1.jsonl").write_bytes(good + latin1 + b"\n")
  with pytest.raises(jsonl.DataError, match=r"latin1\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 16\)"):
    jsonl.read_preferences(str(tmp_path / "latin1.jsonl"))
  bad = jsonl.BadLines()  # a bad byte is a bad line: skippable like malformed JSON
  assert len(jsonl.read_preferences(str(tmp_path / "latin1.jsonl"), skip_bad_lines=True, bad=bad)) == 2
  assert bad.count == 1 and "latin1.jsonl:3: not UTF-8" in bad.reasons[0]
  (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)))
  with pytest.raises(jsonl.DataError, match=r"binary\.jsonl:1: (not UTF-8|malformed JSON)"):
    jsonl.read_texts(str(tmp_path / "binary.jsonl"))
  with pytest.raises(jsonl.DataError, match="is a directory"):
    jsonl.read_texts(str(tmp_path))


def test_mixer_fill_last_and_preference_stream():
  pref, gen = list(range(11)), list(range(100, 107))
  m = mix.Mixer(pref, gen, batch_size=4, general_ratio=0.25, seed=3, fill_last=True, pref_stream=3)
  batches = list(m)
  assert [len(b.preference) for b in batches] == [3, 3, 3, 2]
  assert all(len(b.preference) + len(b.general) == 4 for b in batches)  # the short batch gets extra replay
  assert sorted(x for b in batches for x in b.preference) == pref  # one pass, no repeat
  import numpy as np  # pylint: disable=g-import-not-at-top

  order = np.random.default_rng([3, 3, 0]).permutation(11).tolist()  # stream 3, epoch 0
  assert [x for b in batches for x in b.preference] == order
  replay = [x for b in batches for x in b.general]
  g0 = np.random.default_rng([3, 1, 0]).permutation(7).tolist()
  g1 = np.random.default_rng([3, 1, 1]).permutation(7).tolist()
  assert len(replay) == 5 and replay == [gen[i] for i in (g0 + g1)[:5]]
