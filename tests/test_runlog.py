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
    parse_record,
    read_json,
    read_jsonl,
    read_log,
    read_verdict,
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


# ---------------------------------------------------------------------------------------------------
# bounded readers: hostile run files become warnings, never a hang, a crash or unbounded memory
# ---------------------------------------------------------------------------------------------------
def test_special_files_and_symlinks_out_of_the_run_dir_are_refused_without_blocking(tmp_path):
    import os

    run_dir = tmp_path / "run"
    RunWriter(run_dir).write_config({"label": "grpo"})
    os.mkfifo(run_dir / "samples.jsonl")  # opening a FIFO for reading would block until a writer comes
    (run_dir / "metrics.jsonl").symlink_to("/dev/zero")  # reads without end
    (run_dir / "eval.jsonl").mkdir()  # a directory where a file should be
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"step": 1}\n')
    (run_dir / "probes.jsonl").symlink_to(outside)
    reader = RunReader(run_dir)
    assert reader.poll() == 0
    problems = " | ".join(reader.warnings)
    assert "samples.jsonl is a FIFO" in problems and "eval.jsonl is a directory" in problems
    assert "metrics.jsonl leads outside" in problems and "probes.jsonl leads outside" in problems
    os.symlink("/dev/zero", run_dir / "status.json")
    assert reader.status == {} and read_json(run_dir / "status.json") == {}.get("x")


def test_malformed_values_are_skipped_and_counted(tmp_path):
    path = tmp_path / METRICS
    lines = [
        '{"step": 1, "reward": 0.5}',
        '{"step": 2, "reward": ' + "9" * 5000 + "}",  # beyond Python's int parsing limit
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser's recursion
        '{"step": Infinity}',
        '{"step": 1e999}',
        '{"step": "3"}',
        '{"step": -1}',
        "[1, 2]",
        '{"step": 4, "reward": NaN}',
        '{"step": 5.0, "reward": 0.25}',
    ]
    path.write_text("\n".join(lines) + "\n")
    result = read_log(path)
    assert [r["step"] for r in result.records] == [1, 5] and result.skipped == 8
    assert result.reasons["nested too deep"] == 1 and result.reasons["not a JSON object"] == 1
    reader = RunReader(tmp_path)
    reader.poll()
    assert reader.warnings == [f"{tmp_path.name}: 8 bad line(s) in metrics.jsonl skipped"]


def test_read_json_is_bounded(tmp_path, monkeypatch):
    from lab import runlog

    (tmp_path / "a.json").write_text('{"x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    (tmp_path / "b.json").write_text('{"x": "' + "y" * 200 + '"}')
    assert read_json(tmp_path / "a.json") is None
    monkeypatch.setattr(runlog, "MAX_JSON_BYTES", 100)
    assert read_json(tmp_path / "b.json") is None


def test_a_log_file_beyond_the_cap_is_read_up_to_it_with_a_warning(tmp_path, monkeypatch):
    from lab import runlog

    monkeypatch.setattr(runlog, "MAX_LOG_BYTES", 100)
    path = tmp_path / METRICS
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 40)))
    result = read_log(path)
    assert 0 < len(result.records) < 39 and "larger than" in result.warning
    assert result.records == [{"step": s} for s in range(1, len(result.records) + 1)]


def test_an_endless_partial_line_is_stepped_over(tmp_path, monkeypatch):
    from lab import runlog

    monkeypatch.setattr(runlog, "MAX_LINE_BYTES", 50)
    path = tmp_path / METRICS
    path.write_text('{"step": 1}\n' + "x" * 200)
    result = read_log(path)
    assert result.records == [{"step": 1}] and result.offset == path.stat().st_size and result.skipped == 1


def test_a_verdict_with_malformed_pairs_keeps_the_good_ones(tmp_path):
    good = {"a": "grpo", "b": "delta_l", "metric": "auc", "mean_diff": 0.1, "ci": [0.0, 0.2],
            "ci_t": [None, None], "distinguishable": False, "n_seeds": 3}  # fmt: skip
    pairs = [good, "x", 7, {**good, "ci": "wide"}, {**good, "mean_diff": "big"}, {**good, "a": ["x"]}]
    (tmp_path / "verdict.json").write_text(json.dumps({"pairs": pairs, "labels": [], "warnings": "w"}))
    verdict = read_verdict(tmp_path)
    assert verdict["pairs"] == [good] and verdict["labels"] == {}
    assert verdict["warnings"] == ["5 malformed pair(s) in verdict.json left out"]
    (tmp_path / "verdict.json").write_text(json.dumps({"pairs": [{**good, "n_seeds": 10**30}]}))
    assert (
        read_verdict(tmp_path) is None
    )  # an integer beyond bounds: the file is unreadable (views recompute)


def test_a_run_dir_symlinked_from_elsewhere_is_not_listed(tmp_path):
    RunWriter(tmp_path / "elsewhere" / "run").write_config({"label": "grpo"})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere" / "run")
    RunWriter(tmp_path / "runs" / "own").write_config({"label": "grpo"})
    assert list_runs(tmp_path / "runs") == {".": [tmp_path / "runs" / "own"]}


def complete_records(data: bytes) -> list[dict]:
    """What a fresh read of ``data`` must give: every complete line that is a record within bounds."""
    end = data.rfind(b"\n")
    records = (
        [parse_record(raw)[0] for raw in data[: end + 1].split(b"\n") if raw.strip()] if end >= 0 else []
    )
    return [r for r in records if r is not None]


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"), st.integers(1, 3), st.integers(0, 40)
        ),  # n whole lines, then a partial tail
        st.tuples(st.just("finish"), st.just(0), st.just(0)),  # complete the partial line
        st.tuples(st.just("garbage"), st.just(0), st.just(0)),
        st.tuples(st.just("truncate_after"), st.integers(0, 30), st.just(0)),  # as a resume does: replace
        st.tuples(st.just("cut"), st.integers(0, 400), st.just(0)),  # cut in place at any byte
        st.tuples(st.just("poll"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_incremental_reads_match_a_fresh_read_under_any_interleaving(tmp_path_factory, ops):
    """Property: whatever writes, cuts and replacements happen between polls, the incremental reader
    holds exactly what a fresh read of the file gives (no lost, doubled or misaligned record)."""
    import os

    run_dir = tmp_path_factory.mktemp("prop")
    path = run_dir / METRICS
    path.touch()
    reader, step, pending = RunReader(run_dir), 0, b""
    for op, n, k in ops:
        if op == "append":
            lines = b""
            for _ in range(n):
                step += 1
                lines += json.dumps({"step": step, "wall_time": step * 1.5, "pad": "x" * k}).encode() + b"\n"
            step += 1
            line = json.dumps({"step": step, "pad": "y" * k}).encode() + b"\n"
            cut_at = len(line) // 2
            with open(path, "ab") as f:
                f.write(lines + line[:cut_at])
            pending = line[cut_at:]
        elif op == "finish":
            with open(path, "ab") as f:
                f.write(pending)
            pending = b""
        elif op == "garbage":
            with open(path, "ab") as f:
                f.write(b"{not json\n")
        elif op == "truncate_after":
            truncate_after(path, n)
            pending = b""
        elif op == "cut":
            os.truncate(path, min(n, path.stat().st_size))
            pending = b""
        elif op == "poll":
            reader.poll()
            assert reader.metrics == complete_records(path.read_bytes())
    reader.poll()
    assert reader.metrics == complete_records(path.read_bytes())


def test_the_verdict_names_refused_files_and_skipped_lines(tmp_path):
    import os

    from lab.verdict import compare_runs

    for agg in ("grpo", "delta_l"):
        writer = RunWriter(tmp_path / f"{agg}-s0")
        writer.write_config({"label": agg, "seed": 0})
        writer.log_metrics({"step": 1, "reward": 0.5})
        writer.set_status("finished", 1, 1)
    with open(tmp_path / "grpo-s0" / METRICS, "a") as f:
        f.write('{"step": Infinity, "reward": 1}\n')
    os.mkfifo(tmp_path / "delta_l-s0" / "samples.jsonl")
    verdict = compare_runs(sorted(tmp_path.iterdir()))
    assert "grpo-s0: 1 bad line(s) in metrics.jsonl skipped" in verdict["warnings"]
    assert any("samples.jsonl is a FIFO" in w for w in verdict["warnings"])
