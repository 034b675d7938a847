"""A failed attempt of a training run, on its workers: the line it puts on the driver's console, and
whether the run stops rather than being restarted by Ray Train (`jobs.loop.train_loop_per_worker`
calls these; `jobs.fit` refuses a stopped run)."""

from __future__ import annotations

from jobs.train_job import TrainJob
from muse import storage

# What a worker writes into the run's folder (the error, in one line) when it met an error that fails
# every attempt (`fails_every_attempt`): the next attempt returns at once, and the driver refuses the run.
STOPPED = "_stopped"


def fails_every_attempt(error: BaseException) -> bool:
    """Whether `error` (raised in a worker, maybe through Ray tasks) would fail every restart the same
    way: a token shard damaged after it was written fails each pass that reaches it, a full disk each
    checkpoint, and a file this user may not read or write (a read-only mount) each access."""
    from pipelines.shards import CorruptShard

    return (isinstance(raised_by(error), CorruptShard) or storage.full_disk(error) is not None
            or storage.access_refused(error) is not None)


def stop_run(job: TrainJob, error: BaseException) -> bool:
    """Tell the next attempt to return at once (Ray Train would restart the workers run.max_failures
    times), and so the driver to refuse the run; whether that was written (not on a full disk that
    holds the run's folder: then the run is restarted as for any error). Any rank writes it: the rank
    that met the error may be the only one to raise before the teardown."""
    try:
        storage.write_text(storage.join(job.run_dir, STOPPED), error_line(error))
        return True
    except OSError:
        return False


def attempt_started(job: TrainJob) -> int | None:
    """This attempt's number under this driver, counted by the progress board (rank 0 only; None
    elsewhere or without a board). Ray Train restarts the worker group after a failure, and an
    attempt whose workers or node were killed reports nothing itself: the next one says it resumed."""
    import ray
    import ray.train

    board = job.progress_board
    try:
        if board is None or ray.train.get_context().get_world_rank() != 0:
            return None
        return ray.get(board.attempt_started.remote(job.run_name), timeout=10)
    except Exception:  # the console lines are a courtesy; training goes on without them
        return None


def post_failure(job: TrainJob, attempt: int | None, error: Exception, stops: bool = False) -> None:
    """At the default verbosity the workers' tracebacks stay in Ray's logs, and Ray Train restarts the
    worker group up to run.max_failures times: rank 0 puts one line on the driver's console per failed
    attempt, so a failure that repeats is seen at once."""
    import ray

    board = job.progress_board
    if board is None or attempt is None:
        return
    try:
        line, status = failure_line(job, attempt, error, stops)
        # Waited for: the worker may be torn down next.
        ray.get(board.attempt_failed.remote(job.run_name, line, status), timeout=10)
    except Exception:  # the console line is a courtesy; the error itself still propagates
        pass


def failure_line(job: TrainJob, attempt: int, error: BaseException, stops: bool = False) -> tuple[str, str]:
    """(console line, live-line status) of a failed attempt; `stops`: the run stops after it
    (`stop_run`). An error raised in another Ray task or actor (a data read in Ray Data's split
    coordinator) is named by its cause, whose message is the user's: Ray's own first line holds only
    where it was raised (pid, actor id)."""
    restarted, restarts = _restarts(job, attempt)
    if stops:
        restarted, restarts = False, "it fails every attempt the same way: the run stops"
    line = f"[{job.run_name}] attempt {attempt} failed: {error_line(error)} ({restarts})"
    return line, f"attempt {attempt} failed, restarting" if restarted else "failed"


def error_line(error: BaseException) -> str:
    """The error a worker met (`raised_by`), named, in one line."""
    error = raised_by(error)
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:400]}"


def raised_by(error: BaseException) -> BaseException:
    """The error a Ray task or actor raised, through RayTaskError's wrapping (one per task that waited
    on another: a worker on Ray Data's split coordinator, it on a read task)."""
    for _ in range(8):
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException):
            break
        error = cause
    return error


def _restarts(job: TrainJob, failed: int) -> tuple[bool, str]:
    """After `failed` failed attempts: whether Ray Train starts the workers again (run.max_failures
    restarts, -1 for no limit), and the words for it."""
    stage = job.section_name
    allowed = int(job.section["run"]["max_failures"])
    if 0 <= allowed < failed:
        return False, f"no restarts left of {stage}.run.max_failures={allowed}: the run fails"
    return True, (f"Ray Train restarts the workers from the last checkpoint: restart {failed} of "
                  f"{stage}.run.max_failures={'no limit' if allowed < 0 else allowed}")
