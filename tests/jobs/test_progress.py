"""The console's progress lines: one per running stage, a summary line as each ends, no bars."""

from __future__ import annotations

import contextlib
import io

import pytest

from jobs.progress import Board, Display, Reporter, format_seconds, progress_line
from jobs.train_job import TrainJob


class _Handle:
    """A local stand-in for the board actor's handle: `.update.remote(...)` calls the board."""

    def __init__(self, board: Board):
        for name in ("update", "finish", "note", "attempt_started", "attempt_failed"):
            setattr(self, name, type("Method", (), {"remote": staticmethod(getattr(board, name))})())


def test_progress_line_shows_steps_rate_eta_and_metrics():
    line = progress_line("vqgan_lo", {"done": 500, "total": 2000, "rate": 10.0, "metrics": {"psnr": 24.123}})
    assert "500/2000 steps" in line and "10.0 step/s" in line and "ETA 2m30s" in line and "psnr 24.1" in line
    assert format_seconds(3725) == "1h02m" and format_seconds(59) == "0m59s"


def test_reporter_posts_at_most_every_interval_and_finishes_with_a_summary():
    board = Board()
    reporter = Reporter(_Handle(board), "base", total=100, every=3600)
    reporter.update(1, {"loss": 5.0}, force=True)
    reporter.update(2, {"loss": 4.0})  # within the interval: not posted
    assert board.states["base"]["done"] == 1 and board.states["base"]["metrics"] == {"loss": 5.0}
    reporter.finish("100 steps in 1m00s")
    states, finished = board.poll(0)
    assert states == {} and finished == ["✓ base         100 steps in 1m00s"]
    assert board.poll(1) == ({}, [])
    verbose = Reporter(None, "x", 1)  # verbose: no board, so nothing to post to (a post would raise)
    verbose.update(1, {"loss": 1.0}, force=True)
    verbose.finish("1 step in 1s")
    quiet = Reporter(_Handle(board), "superres", total=10, live=False)  # --no-progress: the summary only
    quiet.update(5, {"loss": 1.0}, force=True)
    quiet.finish("10 steps in 5s")
    assert "superres" not in board.states and board.poll(1) == ({}, ["✓ superres     10 steps in 5s"])


def test_display_prints_running_lines_periodically_and_each_summary_once_without_a_terminal():
    board = Board()
    out = io.StringIO()  # not a terminal: plain lines, as in a CI log or under `ray job submit`
    display = Display(board.poll, stream=out, interval=0.0)
    board.update("base", {"done": 10, "total": 100, "rate": 5.0, "metrics": {}})
    board.note("[all] training base and super-res concurrently")
    display.draw()
    board.finish("base", "100 steps in 20s")
    display.draw()
    display.close()
    text = out.getvalue()
    assert text.count("[all] training base") == 1 and text.count("✓ base") == 1
    assert "10/100 steps" in text and "\x1b[" not in text  # no cursor movement outside a terminal


def test_live_lines_stay_aligned_when_a_run_name_is_longer_than_the_column():
    board = Board()
    out = io.StringIO()
    display = Display(board.poll, stream=out, interval=0.0)
    board.update("base", {"done": 10, "total": 100, "rate": 5.0, "metrics": {}})
    board.update("base-finetune-lora", {"done": 3, "total": 50, "rate": 1.0, "metrics": {}})
    display.draw()
    display.close()
    lines = [line for line in out.getvalue().splitlines() if "steps" in line]
    assert len(lines) == 2 and len({line.index("steps") for line in lines}) == 1


def test_display_redraws_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    board = Board()
    out = Tty()
    display = Display(board.poll, stream=out)
    board.update("base", {"done": 1, "total": 10, "rate": 1.0, "metrics": {}})
    display.draw()
    board.update("base", {"done": 2, "total": 10, "rate": 1.0, "metrics": {}})
    display.draw()
    display.close()
    text = out.getvalue()
    assert "\x1b[1A\x1b[2K" in text  # the previous live line is cleared before the new one
    assert any("2/10 steps" in part for part in text.split("\x1b[1A")[1:])  # redrawn with the new state
    assert "\x1b[2K" in text.split("\x1b[1A")[-1] and "steps" not in text.split("\x1b[1A")[-1]  # cleared at the end


def test_a_failed_attempt_is_one_line_on_the_console(monkeypatch, tmp_path):
    """A worker's exception used to stay in Ray's logs while Ray Train retried it up to
    run.max_failures times: rank 0 now puts its first line on the console, once per attempt."""
    import ray
    import ray.train

    from jobs import attempts, loop

    board = Board()
    rank = [0]
    monkeypatch.setattr(ray.train, "get_context", lambda: type("Ctx", (), {"get_world_rank": lambda self: rank[0]})())
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)  # the stand-in handle answers at once

    def fails(job, attempt):
        raise ValueError("base.lora_rank: LoRA adapts the component already in the model root\nsecond line")

    monkeypatch.setattr(loop, "_train_loop", fails)
    job = TrainJob(root="", component="base", run_name="base", progress_board=_Handle(board), run_dir=str(tmp_path),
                   section={"run": {"max_failures": 1}}).as_config()
    board.update("base", {"done": 40, "total": 100, "rate": 2.0, "metrics": {"loss": 1.5}})
    with pytest.raises(ValueError, match="second line"):  # still raised: Ray Train decides what comes next
        loop.train_loop_per_worker(job)
    # The live line keeps the step reached, without the rate and ETA of the attempt that failed.
    assert progress_line("base", board.poll(0)[0]["base"]).split() == \
        ["base", "40/100", "steps", "attempt", "1", "failed,", "restarting"]
    [line] = board.poll(0)[1]
    assert line.startswith("[base] attempt 1 failed: ValueError: base.lora_rank: LoRA adapts")
    assert "second line" not in line
    assert line.endswith("(Ray Train restarts the workers from the last checkpoint: restart 1 of base.run.max_failures=1)")
    rank[0] = 1  # the other ranks stay quiet: one line per attempt
    with pytest.raises(ValueError):
        loop.train_loop_per_worker(job)
    assert len(board.poll(0)[1]) == 1
    rank[0] = 0  # the last attempt does not promise a restart
    with pytest.raises(ValueError):
        loop.train_loop_per_worker(job)
    last = board.poll(1)[1][0]
    assert board.poll(0)[0]["base"]["status"] == "failed"
    assert last.startswith("[base] attempt 2 failed") and "no restarts left of base.run.max_failures=1: the run fails" in last
    assert not (tmp_path / attempts.STOPPED).exists()  # a restart may mend those


def test_an_error_that_fails_every_attempt_stops_the_run_at_the_next(monkeypatch, tmp_path):
    """A damaged token shard fails every pass that reaches it: the attempt says the run stops, and
    writes the error where the next attempt's workers find it and return before building anything."""
    from ray.exceptions import RayTaskError

    from jobs import attempts, loop
    from pipelines.shards import CorruptShard

    calls = []

    def fails(job, attempt):
        calls.append(attempt)
        read = RayTaskError("ReadTokenShards", "Traceback ...", CorruptShard("t/x.parquet is not a readable shard"))
        raise RayTaskError("SplitCoordinator.get", "Traceback ...", read.as_instanceof_cause()).as_instanceof_cause()

    monkeypatch.setattr(loop, "_train_loop", fails)
    job = TrainJob(root="", component="base", run_name="base", run_dir=str(tmp_path),
                   section={"run": {"max_failures": 100}}).as_config()
    with pytest.raises(RayTaskError):  # still raised: this attempt's workers are torn down as any failed one's
        loop.train_loop_per_worker(job)
    assert (tmp_path / attempts.STOPPED).read_text() == "CorruptShard: t/x.parquet is not a readable shard"
    loop.train_loop_per_worker(job)  # the restart: returns without training
    assert len(calls) == 1


def test_a_full_disk_stops_the_run_where_it_can_say_so(monkeypatch, tmp_path):
    """A full disk fails each checkpoint: the run stops as for a damaged shard, unless the stop cannot
    be written either (the run's folder on that disk), where the restarts go on as for any error."""
    from jobs import attempts, loop

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as f:  # a real ENOSPC
            f.write(b"x" * 65536)
            f.flush()
    calls = []

    def fails(job, attempt):
        calls.append(attempt)
        raise full.value

    monkeypatch.setattr(loop, "_train_loop", fails)
    for run_dir, stops in ((str(tmp_path), True), ("/dev/full/runs/base", False)):
        job = TrainJob(root="", component="base", run_name="base", run_dir=run_dir,
                       section={"run": {"max_failures": 100}}).as_config()
        calls.clear()
        with pytest.raises(OSError):
            loop.train_loop_per_worker(job)
        assert attempts.fails_every_attempt(full.value)
        with contextlib.suppress(OSError):
            loop.train_loop_per_worker(job)  # the restart
        assert len(calls) == (1 if stops else 2)
    assert "No space left on device" in (tmp_path / attempts.STOPPED).read_text()


def test_a_file_this_process_may_not_write_stops_the_run(monkeypatch, tmp_path, read_only_dir):
    """A read-only mount (or another user's file) fails every attempt the same way: the run stops."""
    from jobs import attempts, loop

    with pytest.raises(OSError) as refused:
        open(read_only_dir / "step_000100.png", "wb")  # a real EROFS
    calls = []

    def fails(job, attempt):
        calls.append(attempt)
        raise refused.value

    monkeypatch.setattr(loop, "_train_loop", fails)
    job = TrainJob(root="", component="base", run_name="base", run_dir=str(tmp_path),
                   section={"run": {"max_failures": 100}}).as_config()
    with pytest.raises(OSError):
        loop.train_loop_per_worker(job)
    loop.train_loop_per_worker(job)  # the restart: returns without training
    assert len(calls) == 1 and "Read-only file system" in (tmp_path / attempts.STOPPED).read_text()


def test_an_error_from_another_ray_task_is_named_by_its_cause():
    """A shard that fails its read in Ray Data's split coordinator reaches the worker as a RayTaskError
    whose first line is where it was raised (pid, actor id): the attempt's line names the cause."""
    from ray.exceptions import RayTaskError

    from jobs.attempts import failure_line
    from pipelines.shards import CorruptShard

    read = RayTaskError("ReadTokenShards", "Traceback ...", CorruptShard("s3://b/t/x.parquet is not a readable "
                                                                         "token shard (ArrowInvalid: ...)"))
    error = RayTaskError("SplitCoordinator.get", "Traceback ...", read.as_instanceof_cause()).as_instanceof_cause()
    assert "readable" not in str(error).splitlines()[0]  # Ray's header line: where, not what
    job = TrainJob(root="", component="base", run_name="base", section={"run": {"max_failures": 100}})
    line, status = failure_line(job, 3, error, stops=True)
    assert line.startswith("[base] attempt 3 failed: CorruptShard: s3://b/t/x.parquet is not a readable token shard")
    assert line.endswith("(it fails every attempt the same way: the run stops)")
    assert status == "failed"


def test_a_runs_last_line_gives_metrics_only_where_no_summary_line_did():
    """With the display, its summary line has the run's (smoothed) metrics: the closing line gives the
    checkpoint alone, not a second, different set of numbers. Without it, the closing line has them."""
    from types import SimpleNamespace

    from jobs.stage import result_summary

    result = SimpleNamespace(metrics={"step": 40, "loss": 2.2831, "lr": 1e-4},
                             checkpoint=SimpleNamespace(path="/r/runs/base/checkpoint_000001"))
    assert result_summary(result, metrics=False) == "finished; checkpoint /r/runs/base/checkpoint_000001"
    assert result_summary(result) == "finished (step 40, loss 2.283); checkpoint /r/runs/base/checkpoint_000001"
    import pyarrow.fs  # Ray Train keeps an S3 checkpoint's path without its scheme: the line gives it back

    result.checkpoint = SimpleNamespace(path="bucket/r/runs/base/checkpoint_000001",
                                        filesystem=pyarrow.fs.S3FileSystem(anonymous=True, region="us-east-1"))
    assert result_summary(result, metrics=False) == "finished; checkpoint s3://bucket/r/runs/base/checkpoint_000001"
