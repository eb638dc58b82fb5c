"""Run-log schema round trip and the tolerant incremental reader."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.runlog import (
    METRICS,
    RunReader,
    RunWriter,
    list_runs,
    read_json,
    read_jsonl,
    run_id,
    truncate_after,
)


def test_round_trip(tmp_path):
    writer = RunWriter(tmp_path / "cmp" / "delta_l-s0")
    writer.write_config({"aggregator": "delta_l", "alpha": 1.0})
    writer.set_status("running", 0, 3)
    for step in (1, 2, 3):
        writer.log_metrics({"step": step, "loss": 0.1 * step, "cv/delta_l": float("nan")})
        writer.log_samples({"step": step, "lengths": [3, 4], "weights": [1.1, 0.9]})
    writer.log_eval({"step": 3, "avg_at_k": 0.5, "pass_at_k": 0.75, "k": 4})
    writer.set_status("finished", 3, 3)

    reader = RunReader(tmp_path / "cmp" / "delta_l-s0")
    assert reader.poll() == 7
    assert [m["step"] for m in reader.metrics] == [1, 2, 3]
    assert reader.metrics[0]["cv/delta_l"] is None  # NaN is written as null: valid JSON everywhere
    assert reader.samples[2]["weights"] == [1.1, 0.9]
    assert reader.evals[0]["pass_at_k"] == 0.75
    assert reader.config["aggregator"] == "delta_l" and not reader.is_live
    assert reader.poll() == 0  # nothing new: nothing re-read
    writer.log_metrics({"step": 4, "loss": 0.0})
    assert reader.poll() == 1 and reader.metrics[-1]["step"] == 4
    assert list_runs(tmp_path) == {"cmp": [tmp_path / "cmp" / "delta_l-s0"]}


def test_reader_waits_for_a_half_written_line(tmp_path):
    path = tmp_path / METRICS
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    records, offset = read_jsonl(path)
    assert records == [{"step": 1}] and offset == len('{"step": 1}\n')
    with open(path, "a") as f:
        f.write('ss": 0.5}\n')
    records, offset2 = read_jsonl(path, offset)
    assert records == [{"step": 2, "loss": 0.5}] and offset2 == path.stat().st_size


def test_reader_skips_corrupt_lines_and_missing_files(tmp_path):
    path = tmp_path / METRICS
    path.write_bytes(b'{"step": 1}\nnot json\n\xff\xfe\n[1, 2]\n\n{"step": 2}\n')
    records, _ = read_jsonl(path)
    assert records == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl", 5) == ([], 5)
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "half.json").write_text('{"state": "runn')
    assert read_json(tmp_path / "half.json") is None


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_reader_never_crashes_on_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.jsonl"
    path.write_bytes(data)
    records, offset = read_jsonl(path)
    assert all(isinstance(r, dict) for r in records) and 0 <= offset <= len(data)


def test_truncate_after_drops_later_steps_and_partial_lines(tmp_path):
    path = tmp_path / METRICS
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6')
    assert truncate_after(path, 3) == 3
    assert [r["step"] for r in read_jsonl(path)[0]] == [1, 2, 3]
    assert path.read_text().endswith("\n")


def test_status_rejects_unknown_state(tmp_path):
    with pytest.raises(ValueError, match="'paused'"):
        RunWriter(tmp_path).set_status("paused", 0, 1)


def test_disabled_writer_writes_nothing(tmp_path):
    writer = RunWriter(tmp_path / "rank1", enabled=False)
    writer.log_metrics({"step": 1})
    writer.set_status("running", 0, 1)
    assert not (tmp_path / "rank1").exists()


def test_run_ids():
    assert run_id("delta_l", 0) == "delta_l-s0"
    assert run_id("delta_l", 2, alpha=0.75) == "delta_l-a0.75-s2"
    assert run_id("grpo", 1, alpha=0.5) == "grpo-s1"
