"""lab.rundir and lab.workers: one writer per run dir, a run's config as its identity, the checkpoint a resume
takes, status writes on a full disk, settings checked before any dir exists, a pool that survives a kill."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lab import rundir
from lab.runlog import RunReader, RunWriter, read_json
from lab.workers import Job, run_jobs

HOLD_LOCK = "import sys, time; from lab.rundir import acquire_lock; acquire_lock(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------------------------------------------
# one writer per run dir
# ---------------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_holders_pid_and_kill_9_leaves_no_stale_lock(tmp_path):
    proc = hold_lock_in_child(tmp_path)
    try:
        assert rundir.is_locked(tmp_path)
        with pytest.raises(rundir.RunDirBusy, match=rf"{tmp_path} is being written by process {proc.pid}"):
            rundir.acquire_lock(tmp_path)
        with pytest.raises(rundir.RunDirBusy, match=str(proc.pid)):
            rundir.check_before_writing(tmp_path, {}, resume=True)
        assert len(rundir.busy_runs(tmp_path)) == 1 and rundir.busy_runs(tmp_path / "none") == []
    finally:
        proc.kill()  # SIGKILL: no cleanup
        proc.wait()
    assert not rundir.is_locked(tmp_path)
    lock = rundir.acquire_lock(tmp_path)  # the OS released it with the process
    assert rundir.holder_pid(tmp_path) == os.getpid()
    lock.release()


def test_probing_a_lock_creates_nothing_and_readers_never_lock(tmp_path):
    assert not rundir.is_locked(tmp_path / "absent") and not (tmp_path / "absent").exists()
    writer = RunWriter(tmp_path / "run")
    writer.log_metrics({"step": 1, "reward": 0.5})
    lock = rundir.acquire_lock(tmp_path / "run")
    try:
        reader = RunReader(tmp_path / "run")
        assert reader.poll() == 1 and reader.metrics[0]["reward"] == 0.5  # reading a locked run works
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------
# a run's config is its identity
# ---------------------------------------------------------------------------------------------------
def stored_run(tmp_path: Path, **run) -> Path:
    base = {"steps": 2, "learning_rate": 2e-5, "length_range": [2, 6], "threads": 1, "optimizer": "adamw"}
    RunWriter(tmp_path).write_config({"run": {**base, **run}})
    RunWriter(tmp_path).log_metrics({"step": 1})
    return tmp_path


def test_a_changed_setting_is_refused_with_each_differing_field_named(tmp_path):
    run_dir = stored_run(tmp_path)
    requested = {
        "steps": 3,
        "learning_rate": 1e-3,
        "length_range": (2, 6),
        "threads": 4,
        "optimizer": "adamw",
    }
    with pytest.raises(rundir.RunDirError) as err:
        rundir.check_same_config(run_dir, requested)
    message = str(err.value)
    assert "steps: 2 → 3" in message and "learning_rate: 2e-05 → 0.001" in message
    assert (
        "threads" not in message and "length_range" not in message
    )  # harmless; a tuple equals its JSON list


def test_the_same_settings_pass_and_harmless_ones_may_change(tmp_path):
    run_dir = stored_run(tmp_path)
    rundir.check_same_config(run_dir, {"steps": 2, "learning_rate": 2e-5, "length_range": (2, 6), "threads": 8,
                                       "optimizer": "adamw", "report_to": ["tensorboard"]})  # fmt: skip


def test_logged_steps_without_a_readable_config_are_refused(tmp_path):
    RunWriter(tmp_path).log_metrics({"step": 1})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(rundir.RunDirError, match=r"config\.json is missing or unreadable"):
        rundir.check_same_config(tmp_path, {"steps": 2})


# ---------------------------------------------------------------------------------------------------
# the checkpoint a resume takes
# ---------------------------------------------------------------------------------------------------
def make_checkpoint(run_dir: Path, step: int) -> Path:
    from safetensors.torch import save_file

    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(folder / "model.safetensors"))
    torch.save({"state": torch.zeros(64)}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def cut(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: min(keep, len(data) - 1)])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: cut(c / "model.safetensors", 200), "model.safetensors: truncated"),
        (lambda c: cut(c / "model.safetensors", 4), "model.safetensors: unreadable header"),
        (lambda c: cut(c / "optimizer.pt", 300), "optimizer.pt: not a complete torch file"),
        (lambda c: (c / "trainer_state.json").write_text("garbage{"), "trainer_state.json: not readable JSON"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 1}'), "trainer_state.json: no global_step 4"),
        (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    ],
)  # fmt: skip
def test_a_broken_latest_checkpoint_gives_the_previous_intact_one_naming_the_broken_file(
    tmp_path, damage, named
):
    make_checkpoint(tmp_path, 2)
    latest = make_checkpoint(tmp_path, 4)
    assert rundir.choose_checkpoint(tmp_path).checkpoint == latest
    damage(latest)
    point = rundir.choose_checkpoint(tmp_path)
    assert point.checkpoint == tmp_path / "checkpoints" / "checkpoint-2" and point.step == 2
    assert len(point.skipped) == 1 and named in point.skipped[0] and str(latest) in point.skipped[0]


def test_logged_steps_without_an_intact_checkpoint_are_refused_not_restarted(tmp_path):
    assert rundir.choose_checkpoint(tmp_path).checkpoint is None  # nothing logged: a fresh start is fine
    writer = RunWriter(tmp_path)
    writer.log_metrics({"step": 1})
    writer.set_status("interrupted", 1, 5)
    with pytest.raises(rundir.RunDirError, match="nothing to resume from: no intact checkpoint"):
        rundir.choose_checkpoint(tmp_path)
    cut(make_checkpoint(tmp_path, 1) / "optimizer.pt", 100)
    writer.write_config({"run": {"steps": 5}})
    with pytest.raises(rundir.RunDirError, match=r"broken: .*optimizer\.pt"):
        rundir.check_before_writing(tmp_path, {"steps": 5}, resume=True)


# ---------------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------------
def test_status_is_written_in_place_when_the_disk_is_full_and_no_temp_file_stays(tmp_path, monkeypatch):
    writer = RunWriter(tmp_path)
    writer.set_status("running", 3, 10)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)  # the atomic rename of every status write fails
    writer.set_status("failed", 3, 10, error=rundir.describe_os_error(OSError(errno.ENOSPC, "x")))
    status = read_json(tmp_path / "status.json")
    assert status["state"] == "failed" and "no space left on the device" in status["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no .status.json.<pid>.tmp


def test_record_failure_removes_a_dir_that_failed_before_its_first_step(tmp_path):
    run_dir = tmp_path / "out" / "run"
    created = [run_dir, run_dir.parent]
    run_dir.mkdir(parents=True)
    rundir.record_failure(RunWriter(run_dir), RuntimeError("boom"), 0, 5, created)
    assert not (tmp_path / "out").exists()


def test_a_killed_workers_run_is_marked_failed(tmp_path):
    RunWriter(tmp_path).set_status("running", 2, 9)
    rundir.mark_killed(tmp_path, "worker process killed by SIGKILL")
    status = read_json(tmp_path / "status.json")
    assert (status["state"], status["step"], status["error"]) == (
        "failed",
        2,
        "worker process killed by SIGKILL",
    )


# ---------------------------------------------------------------------------------------------------
# settings checked before any dir is made
# ---------------------------------------------------------------------------------------------------
def test_out_must_be_given_and_writable():
    with pytest.raises(ValueError, match="--out is empty"):
        rundir.check_out("")
    with pytest.raises(ValueError, match="is not writable"):
        rundir.check_out(Path("/proc/lab-runs/x"))  # /proc takes no new files, even from root


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_bad_seeds_are_named(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        rundir.check_seed(seed)


def test_unknown_report_to_is_named():
    rundir.check_report_to(["none"])
    with pytest.raises(ValueError, match=r"unknown integration.*bogus"):
        rundir.check_report_to(["tensorboard", "bogus"])


# ---------------------------------------------------------------------------------------------------
# the worker pool: a killed worker loses only its own run
# ---------------------------------------------------------------------------------------------------
def _init(stop) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _job(name: str, seconds: float) -> str:
    if name == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
    return "finished"


def test_a_killed_worker_loses_its_run_only_and_the_queue_goes_on():
    jobs = [
        Job("killed", ("killed", 0)),
        Job("slow", ("slow", 1.0)),
        Job("queued-1", ("q", 0)),
        Job("queued-2", ("q", 0)),
    ]
    seen, killed = [], []
    out = run_jobs(jobs, workers=2, target=_job, init=_init,
                   on_result=lambda job, r: seen.append(job.name), on_killed=lambda job, r: killed.append((job.name, r)))  # fmt: skip
    assert out.results == {
        "killed": "failed: worker process killed by SIGKILL",
        "slow": "finished",
        "queued-1": "finished",
        "queued-2": "finished",
    }
    assert killed == [("killed", "failed: worker process killed by SIGKILL")] and sorted(seen) == [
        "queued-1",
        "queued-2",
        "slow",
    ]


# ---------------------------------------------------------------------------------------------------
# the Launch tab: extra arguments bounded like the form's fields, blank tokens, a busy comparison
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    ["--prompts-per-step 100000000", "--eval-prompts 1000000", "--num-generations 5000", "--workers 10000",
     "--max-completion-length 10000000", "--threads 999", "--seed -1"],
)  # fmt: skip
def test_launch_extras_are_bounded_like_the_forms_fields(tmp_path, extra):
    from lab.dashboard import launch

    option = extra.split()[0]
    with pytest.raises(ValueError, match=rf"{option} must be between"):
        launch.plan_launch(tmp_path, "c1", ["grpo"], steps=2, seeds=1, extra=extra)
    assert not (tmp_path / "c1").exists()
    launch.plan_launch(
        tmp_path, "c1", ["grpo"], steps=2, seeds=1, extra="--prompts-per-step 4 --eval-prompts 8"
    )


def test_a_launch_token_of_spaces_is_refused():
    from lab.dashboard import launch

    assert launch.launch_token({launch.TOKEN_ENV: " " * 40}) is None
    assert launch.launch_token({launch.TOKEN_ENV: " " * 10 + "x" * 15}) is None
    assert launch.launch_token({launch.TOKEN_ENV: "x" * 16}) == "x" * 16


def test_launch_refuses_a_comparison_another_process_writes(tmp_path):
    from lab.dashboard import launch

    run_dir = tmp_path / "c1" / "grpo-s0"
    run_dir.mkdir(parents=True)
    proc = hold_lock_in_child(run_dir)
    try:
        with pytest.raises(ValueError, match=rf"{run_dir} is being written by process {proc.pid}"):
            launch.plan_launch(tmp_path, "c1", ["grpo"], steps=2, seeds=1, extra="--resume")
    finally:
        proc.kill()
        proc.wait()
    launch.plan_launch(tmp_path, "c1", ["grpo"], steps=2, seeds=1, extra="--resume")


def test_a_planted_lock_file_neither_blocks_nor_leads_elsewhere(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(OSError):
        rundir.acquire_lock(tmp_path / "run")  # O_NOFOLLOW: the file it points to is not truncated
    assert victim.read_text() == "keep me"
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / ".lock")
    assert rundir.holder_pid(tmp_path / "fifo") is None and not rundir.is_locked(tmp_path / "fifo")
    with pytest.raises(rundir.RunDirError, match="not a regular file"):
        rundir.acquire_lock(tmp_path / "fifo")
