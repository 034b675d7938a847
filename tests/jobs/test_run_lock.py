"""One driver per run folder (jobs.run_lock, taken in jobs.fit.fit_stage). The same training job submitted
twice used to train one run folder from two drivers, each deleting the other's checkpoints until one
failed on a checkpoint that was gone. Each test runs on a local folder and on S3 (the moto server); no
Ray is started."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from jobs_helpers import tiny_config

from jobs import fit, run_lock
from jobs.base import BaseWorker
from jobs.preflight import RunRefused
from jobs.stage import errors_in_one_line
from jobs.train_job import TrainJob
from muse import storage

QUICK = 0.1  # claim wait where only one driver claims


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    """A runs folder (ROOT/runs) on local disk or in a fresh S3 bucket."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/runs"
    return str(tmp_path / "runs")


def claims(folder: str) -> list[str]:
    return [f.rsplit("/", 1)[-1] for f in storage.list_files(folder, recursive=False)
            if f.rsplit("/", 1)[-1].startswith(run_lock.PREFIX)]


def write_claim(folder: str, token: str, **who) -> None:
    """Another driver's claim, as its RunLock writes it."""
    storage.write_text(storage.join(folder, run_lock.PREFIX + token + run_lock.SUFFIX),
                       json.dumps({"token": token, "state": "held", "beats": 1} | who))


def test_a_second_driver_on_a_held_run_folder_is_refused_naming_who_holds_it(where):
    folder = storage.join(where, "base")
    lock = run_lock.claim(folder, "base", "base", claim_wait=QUICK)
    try:
        with pytest.raises(RunRefused) as refused:
            run_lock.claim(folder, "base", "base", claim_wait=QUICK)
        line = str(refused.value)
        assert "\n" not in line
        assert f"another run is training {folder}: host {socket.gethostname()}, pid {os.getpid()}, heartbeat " in line
        assert "Wait for it to end, or pass --set base.run.name=NEW" in line
        assert claims(folder) == [run_lock.PREFIX + lock.token + run_lock.SUFFIX]  # the refused claim is gone
        # Another run folder (train all's super-res beside base, in another thread) is no conflict.
        other: list = []
        thread = threading.Thread(target=lambda: other.append(
            run_lock.claim(storage.join(where, "superres"), "superres", "superres", claim_wait=QUICK)))
        thread.start()
        thread.join()
        assert len(other) == 1
        other[0].release()
    finally:
        lock.release()


def test_two_drivers_claiming_at_once_leave_exactly_one_holder(where):
    folder = storage.join(where, "base")
    start, won, refused = threading.Barrier(2), [], []

    def driver() -> None:
        start.wait()
        try:
            won.append(run_lock.claim(folder, "base", "base"))  # the default wait: the race is the point
        except RunRefused as e:
            refused.append(e)

    threads = [threading.Thread(target=driver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 1, (won, refused)
        assert "another run is training" in str(refused[0])
        assert claims(folder) == [run_lock.PREFIX + won[0].token + run_lock.SUFFIX]
    finally:
        for lock in won:
            lock.release()


def test_a_dead_drivers_lock_is_taken_over_with_a_line_saying_so(where, capsys):
    folder = storage.join(where, "base")
    write_claim(folder, "0" * 32, host="elsewhere", pid=4242)
    time.sleep(1.5)  # older than `stale` below by the store's clock (S3: whole seconds)
    lock = run_lock.claim(folder, "base", "base", stale=1.0, claim_wait=QUICK)
    try:
        out = capsys.readouterr().out
        assert f"[base] taking over {folder} from a driver taken for dead (host elsewhere, pid 4242" in out
        assert claims(folder) == [run_lock.PREFIX + lock.token + run_lock.SUFFIX]
    finally:
        lock.release()
    # A fresh lock of a process that is gone from this host (Ctrl-C'd, killed) need not be waited out.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_claim(folder, "1" * 32, host=socket.gethostname(), pid=gone.pid)
    lock = run_lock.claim(folder, "base", "base", claim_wait=QUICK)
    try:
        assert "its process is gone from this host" in capsys.readouterr().out
    finally:
        lock.release()
    # A fresh lock of a live driver elsewhere is not taken over.
    write_claim(folder, "2" * 32, host="elsewhere", pid=4242)
    with pytest.raises(RunRefused, match="host elsewhere, pid 4242"):
        run_lock.claim(folder, "base", "base", claim_wait=QUICK)


def test_release_leaves_no_file_and_deletes_only_its_own_claim(where):
    folder = storage.join(where, "base")
    lock = run_lock.claim(folder, "base", "base", claim_wait=QUICK)
    lock.release()
    assert claims(folder) == []
    again = run_lock.claim(folder, "base", "base", claim_wait=QUICK)  # the next run of this folder
    # Taken for dead meanwhile (its heartbeat was silent too long) and held by another driver: that
    # driver's claim stays when this one ends.
    storage.delete(again.uri)
    write_claim(folder, "f" * 32, host="elsewhere", pid=4242)
    again.release()
    assert claims(folder) == [run_lock.PREFIX + "f" * 32 + run_lock.SUFFIX]


def test_a_stop_that_leaves_trainer_threads_behind_releases_every_lock_held(tmp_path):
    """`train all` stopped mid-run exits without its threads: their locks go with it, not after 3 min."""
    base, superres = str(tmp_path / "runs" / "base"), str(tmp_path / "runs" / "superres")
    held = [run_lock.claim(folder, name, name, claim_wait=QUICK) for folder, name in ((base, "base"),
                                                                                     (superres, "superres"))]
    run_lock.release_all()
    assert claims(base) == claims(superres) == [] and all(lock._stop.is_set() for lock in held)
    run_lock.release_all()  # nothing left: nothing to do


def beats(uri: str) -> int:
    """The claim's beat count; -1 for a read that met a beat being written (the S3 test server does
    not serve a PUT atomically)."""
    try:
        return json.loads(storage.read_text(uri))["beats"]
    except ValueError:
        return -1


def test_the_holder_refreshes_its_heartbeat_until_released(where):
    folder = storage.join(where, "base")
    lock = run_lock.claim(folder, "base", "base", interval=0.2, claim_wait=QUICK)
    try:
        first = json.loads(storage.read_text(lock.uri))
        assert first["state"] == "held" and first["pid"] == os.getpid()
        deadline = time.monotonic() + 20
        while beats(lock.uri) < first["beats"] + 2:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.1)
    finally:
        lock.release()
    time.sleep(0.5)
    assert claims(folder) == []  # no beat after release writes it again


@pytest.mark.parametrize("started", ["in a terminal", "in the background"])
def test_a_holder_whose_claim_was_taken_over_stops_its_driver_with_a_line_saying_why(where, capsys, started):
    """Its driver was silent (Ctrl-Z, storage unreachable), not dead, and another took the run over:
    it stops as a stop signal does, and the command's last line says why, so that two drivers never
    go on training one run. Started in the background (nohup ... &) SIGINT is ignored, and the stop
    goes through SIGTERM, which the commands turn into KeyboardInterrupt."""
    from jobs.cluster import stop_on_sigterm

    folder = storage.join(where, "base")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    if started == "in a terminal":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_on_sigterm()
    lock = run_lock.claim(folder, "base", "base", interval=0.2, claim_wait=QUICK)
    try:
        with pytest.raises(SystemExit) as exited, errors_in_one_line(argparse.ArgumentParser(prog="muse train base")):
            storage.delete(lock.uri)  # what another driver's take-over does
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.05)
        assert exited.value.code == 1
        lock._thread.join(timeout=5)
        assert not storage.exists(lock.uri) and not lock._thread.is_alive()  # not written again
        line = capsys.readouterr().err
        assert f"muse train base: error: [base] another driver took over {folder}" in line, line
        assert "This driver stops so that only one trains the run" in line
    finally:
        run_lock._taken_over.clear()
        lock.release()
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_fit_stage_refuses_a_run_folder_another_driver_trains_and_releases_its_own(tmp_path):
    root = str(tmp_path / "root")
    folder = os.path.join(root, "runs", "base")
    job = TrainJob(root=root, component="base", stage="base", model_config={"layers": 2})
    held = run_lock.claim(folder, "base", "base", claim_wait=QUICK)
    try:
        with pytest.raises(RunRefused, match=rf"another run is training {folder}: .* --set base\.run\.name=NEW"):
            fit.fit_stage(BaseWorker, tiny_config().base, job, dataset=None)
    finally:
        held.release()
    # A run refused after taking the lock (too few rows) lets it go.
    section = tiny_config("base.run.batch_size=32", "base.scaling.num_workers=2").base
    with pytest.raises(RunRefused, match="24 rows"):
        fit.fit_stage(BaseWorker, section, job, dataset=None, rows=24)
    assert claims(folder) == []
