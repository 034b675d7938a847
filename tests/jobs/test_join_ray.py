"""jobs.cluster.join_ray: which Ray each entry point joins, with ray.init recorded (nothing started)."""

import json
import os
import subprocess
import sys
import time

import pytest
import ray
import ray._private.utils
from jobs_helpers import REPO

from jobs import cluster
from jobs.cluster import LOCAL_DRIVER_ENV, join_ray


@pytest.fixture
def calls(monkeypatch):
    """ray.init recorded; no RAY_ADDRESS, no `ray start` cluster, no Ray connected."""
    recorded: list[dict] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(cluster, "stop_on_sigterm", lambda: None)  # this process keeps pytest's handlers
    monkeypatch.setattr(cluster, "check_reachable", lambda address, source: None)  # nothing listens at them
    return recorded


def test_a_new_local_ray_takes_the_local_options(calls):
    assert join_ray({"A": "1"}, num_cpus=6, local_env={"B": "2"}, include_dashboard=False, quiet=False) is True
    assert calls == [{"address": "local", "num_cpus": 6, "runtime_env": {"env_vars": {"A": "1", "B": "2"}},
                      "include_dashboard": False}]


def test_only_a_local_ray_gets_the_local_driver_settings(calls, monkeypatch):
    for key in LOCAL_DRIVER_ENV:  # (set, then removed: monkeypatch restores the original state after)
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    join_ray()
    assert not any(key in os.environ for key in LOCAL_DRIVER_ENV)  # a cluster keeps Ray's own settings
    monkeypatch.delenv("RAY_ADDRESS")
    join_ray()
    assert {key: os.environ[key] for key in LOCAL_DRIVER_ENV} == LOCAL_DRIVER_ENV
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    join_ray()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"  # the user's own value wins


def test_ray_address_is_joined_as_it_is(calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert join_ray({"A": "1"}, num_cpus=6, local_env={"B": "2"}, include_dashboard=False, quiet=False) is False
    assert calls == [{"address": "10.0.0.5:6379", "runtime_env": {"env_vars": {"A": "1"}}}]


def test_ray_address_local_starts_a_local_ray_with_the_local_options(calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert join_ray({"A": "1"}, num_cpus=6, local_env={"B": "2"}) is True  # the caller's to shut down
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 6


def test_a_ray_start_cluster_on_the_node_is_joined(calls, monkeypatch):
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: "127.0.0.1:6380")
    assert join_ray(num_cpus=6) is False
    assert calls[0]["address"] == "127.0.0.1:6380" and "num_cpus" not in calls[0]
    assert calls[0]["log_to_driver"] is False  # quiet by default (jobs.progress.ray_init_kwargs)


def test_a_ray_without_the_private_address_reader_falls_back_to_ray_address(calls, monkeypatch, caplog):
    """`read_ray_address` is private to Ray (this Ray has it: the test above); were it moved, a local
    Ray starts with a warning saying how to join the `ray start` cluster instead of every entry point
    failing on its import."""
    monkeypatch.delattr(ray._private.utils, "read_ray_address")
    with caplog.at_level("WARNING", logger="jobs.cluster"):
        assert join_ray(num_cpus=6) is True
    assert "num_cpus" in calls[0] and "set RAY_ADDRESS" in caplog.text


def test_a_connected_process_stays_as_it_is(calls, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert join_ray(num_cpus=6) is False and calls == []


def test_a_submitted_job_leaves_its_own_env_vars_to_its_runtime_env(calls, monkeypatch):
    """`ray job submit --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL_S3": ...}}'` sets variables
    that tokenize forwards too: Ray refuses a driver runtime_env naming the same variable (even with the
    same value), so the job's own values are left to the job."""
    from ray._private.worker import _merge_runtime_env

    job_env = {"env_vars": {"AWS_ENDPOINT_URL_S3": "http://minio:9000", "MUSE_VERBOSE": "1"}}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    forwarded = {"AWS_ENDPOINT_URL_S3": "http://minio:9000", "MUSE_VERBOSE": "", "TOKENIZERS_PARALLELISM": "false"}
    assert _merge_runtime_env(job_env, {"env_vars": forwarded}) is None  # what Ray would refuse
    join_ray(forwarded)
    assert calls[0]["runtime_env"] == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    assert _merge_runtime_env(job_env, calls[0]["runtime_env"]) is not None


def test_local_paths_are_refused_on_a_ray_of_several_nodes(monkeypatch, capsys):
    """A local --output on a cluster scatters shards over the nodes' disks while the job succeeds; a
    local checkpoint dies with its node: refused where Ray has several nodes, a warning where it may
    grow, and allowed where every node mounts the path (MUSE_SHARED_FS=1)."""
    from jobs.cluster import LocalPathRefused, check_shared_paths

    nodes = [{"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    paths = {"--output": "/data/tokens", "--input": "s3://bucket/corpus", "vqgan_hi": None}
    check_shared_paths(paths)  # one live node: the paths are this node's
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a cluster the autoscaler may grow
    check_shared_paths(paths)
    assert "warning: --output /data/tokens is local" in capsys.readouterr().out
    nodes.append({"Alive": True})
    with pytest.raises(LocalPathRefused, match=r"2 nodes and --output /data/tokens is local"):
        check_shared_paths(paths)
    check_shared_paths({"--input": "s3://bucket/corpus"})  # S3 only: nothing to say
    monkeypatch.setenv("MUSE_SHARED_FS", "1")
    check_shared_paths(paths)


def test_bookkeeping_actors_are_pinned_to_the_drivers_node(ray_session):
    """The progress board and tokenization's coordinator hold no CPU, so Ray may place them on any
    node, spot workers included: they are pinned to the driver's node, hard. The board keeps each
    caller's lines in the order sent."""
    from jobs import progress
    from jobs.placement import on_this_node

    strategy = on_this_node()["scheduling_strategy"]
    assert strategy.node_id == ray.get_runtime_context().get_node_id() and strategy.soft is False
    board = progress.board()  # created with them

    # A stage's summary and the driver's next lines show in the order they were sent.
    seen = len(ray.get(board.poll.remote(0))[1])
    for i in range(200):
        board.finish.remote("stage", str(i)) if i % 2 else board.note.remote(str(i))
    shown = [int(line.split()[-1]) for line in ray.get(board.poll.remote(seen))[1]]
    assert shown == list(range(200))

    @ray.remote(num_cpus=0)
    class Probe:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    assert ray.get(Probe.options(**on_this_node()).remote().node.remote()) == strategy.node_id


STOPPED_BY_SIGTERM = """
import argparse, os, signal, time
from jobs import cluster
from jobs.cluster import join_ray
from jobs.stage import errors_in_one_line

cluster.cluster_address = lambda: None  # a local Ray of its own, whatever runs on this machine
with errors_in_one_line(argparse.ArgumentParser(prog="muse train base")):
    join_ray(num_cpus=1, include_dashboard=False)
    os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop` sends the driver
    time.sleep(60)
"""


def test_sigterm_ends_a_command_with_its_own_line(tmp_path):
    """`ray job stop` sends a job's driver SIGTERM, on which ray.init's handler exited at once (status
    15, Ray's signal dump, nothing of ours). After join_ray it ends the command as Ctrl-C does: one
    line that says what stays, exit status 130."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", STOPPED_BY_SIGTERM], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 130, run.stderr[-3000:]
    assert "muse train base: stopped; finished stages and registered checkpoints stay" in run.stderr
    assert "SIGTERM received" not in run.stderr + run.stdout


STOPPED_IN_CONCURRENT_TRAINING = """
import argparse, os, signal, sys, threading, time
import ray
sys.path.insert(0, os.path.join({repo!r}, "tests", "jobs"))
from jobs_helpers import tiny_config
from jobs import all as train_all, cluster, fit as fit_module
from jobs.cluster import join_ray
from jobs.progress import Reporter, start_display
from jobs.stage import errors_in_one_line

cluster.cluster_address = lambda: None  # a local Ray of its own, whatever runs on this machine
started = threading.Barrier(3)

@ray.remote(num_cpus=0)
class Fit:  # as Ray Train's fit() waits on its controller actor: a blocking ray.get in the thread
    def run(self):
        time.sleep(600)

def run_stage(stage, *args, **kwargs):
    fit_module.run_folders[stage] = os.path.join({runs!r}, stage)  # as fit_stage records it
    Reporter(start_display(), stage, total=100).update(3, force=True)
    fit = Fit.remote()
    started.wait()
    ray.get(fit.run.remote())

train_all.run_stage, train_all.ensure_ray = run_stage, lambda: None
train_all.check_before_training = lambda *args: None  # no tokens here
from pipelines import tokenize  # the corpus is tokenized already, as far as this run knows
tokenize.run = lambda *args, **kwargs: {{"run_parts": 0, "run_rows": 0}}
with errors_in_one_line(argparse.ArgumentParser(prog="muse train all")):
    join_ray(num_cpus=4, include_dashboard=False)
    threading.Thread(target=lambda: (started.wait(), time.sleep(2), os.kill(os.getpid(), signal.SIGTERM)),
                     daemon=True).start()
    train_all.train_all(tiny_config("stages=[base,superres]"), "corpus", {root!r}, tokens={tokens!r})
"""


def test_a_stop_ends_base_and_superres_training_side_by_side(tmp_path):
    """`train all` trains base and super-res in two threads, where Ray Train's own Ctrl-C handling does
    not reach: a stop waited for both to train to the end, then said 'stopped'. Now it leaves Ray (the
    trainers are this driver's) and exits at once, with the steps each stage reached and where each
    resumes: its latest registered checkpoint."""
    from test_preflight import write_checkpoint

    from muse.checkpoint import init_model_root

    root, tokens = str(tmp_path / "root"), str(tmp_path / "tokens")
    write_checkpoint(str(tmp_path / "runs" / "base"), "checkpoint_2026-12-01_10-00-00.000001", None)  # step 2
    init_model_root("tiny", root)
    os.makedirs(tokens)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    script = STOPPED_IN_CONCURRENT_TRAINING.format(repo=str(REPO), root=root, tokens=tokens,
                                                   runs=str(tmp_path / "runs"))
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 130, run.stderr[-3000:]
    assert "muse train all: stopped with " in run.stderr, run.stderr[-3000:]
    assert "base at 3/100 steps (resumes from step 2)" in run.stderr, run.stderr[-3000:]
    assert "superres at 3/100 steps (no checkpoint yet)" in run.stderr and time.monotonic() - start < 90


def test_a_stop_during_one_stages_fit_reaches_our_handler():
    """Ray Train 2.60's fit() in the main thread installs a SIGINT handler of its own (abort, maybe
    sys.exit(0)) and keeps it: the command then ended with status 1 or 0 and no line of ours. fit()
    runs in a thread of its own, so Ctrl-C is our KeyboardInterrupt (StopWithThreads: the stop line,
    status 130), and the main thread's handler is the one it had before."""
    import signal
    import threading

    from jobs.fit import StopWithThreads, fit_off_the_main_thread

    release = threading.Event()

    class Trainer:  # what Ray Train's fit() does with signals, then a run that goes on
        def fit(self):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
            release.wait(30)
            return "result"

    # A command starts with Python's own handler (an earlier test in this process may have left Ray's).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            with pytest.raises(StopWithThreads):
                fit_off_the_main_thread(Trainer())
        finally:
            release.set()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    release.clear()
    threading.Timer(0.2, release.set).start()
    assert fit_off_the_main_thread(Trainer()) == "result"


def test_whether_the_cluster_may_grow(monkeypatch, tmp_path):
    """A submitted job's RAY_ADDRESS is Ray's own, not a sign of an autoscaler: a job on a plain
    `ray start` cluster is refused what would wait for ever. The autoscaler's node groups as Ray
    records them, a `ray up` head, or MUSE_CLUSTER_GROWS decide instead."""
    monkeypatch.setattr(cluster, "RAY_UP_CONFIG", str(tmp_path / "ray_bootstrap_config.yaml"))
    monkeypatch.setattr(cluster, "_autoscaler_limits", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.delenv(cluster.GROWS_ENV, raising=False)
    monkeypatch.delenv(cluster.JOB_CONFIG_ENV, raising=False)
    assert cluster.cluster_may_grow()  # set by the user: a remote cluster with an autoscaler
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's name for a new local instance: no autoscaler
    assert not cluster.cluster_may_grow()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, "{}")  # what the job supervisor sets beside it
    assert not cluster.cluster_may_grow()
    (tmp_path / "ray_bootstrap_config.yaml").write_text("max_workers: 4\n")
    assert cluster.cluster_may_grow()  # the head of a `ray up` cluster
    monkeypatch.setenv(cluster.GROWS_ENV, "0")
    assert not cluster.cluster_may_grow()

    monkeypatch.delenv(cluster.GROWS_ENV)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(cluster, "_autoscaler_limits", lambda: {"CPU": 8.0, "GPU": 4.0})
    assert cluster.cluster_may_grow()  # GPU nodes it can add
    monkeypatch.setattr(cluster, "_autoscaler_limits", lambda: {"CPU": 8.0})
    assert not cluster.cluster_may_grow()  # at its most already, whatever else says


def test_a_submitted_job_refuses_paths_inside_its_working_dir_copy(monkeypatch, tmp_path):
    """`ray job submit --working-dir . -- muse tokenize --output tokens` would write into Ray's unpacked
    copy of the working dir, deleted after the job: refused, naming the flag. Absolute paths pass."""
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.setenv(cluster.SHARED_FS_ENV, "1")  # the node count is not what is checked here
    cluster.check_shared_paths({"--output": str(package / "tokens")})  # not a submitted job
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, "{}")
    with pytest.raises(cluster.LocalPathRefused, match=r"--output .*tokens lies in this job's copy of its --working-dir"):
        cluster.check_shared_paths({"--output": str(package / "tokens"), "--input": "s3://bucket/corpus"})
    cluster.check_shared_paths({"--output": str(tmp_path / "shared" / "tokens")})


def test_a_cluster_that_does_not_answer_is_one_line_within_the_gcs_wait(tmp_path, monkeypatch, capsys):
    """RAY_ADDRESS naming a cluster that is down: ray.init tried for ~14 minutes, printing a warning
    every few seconds. Every command now says so in one line (exit status 2) within Ray's GCS wait."""
    import signal
    import socket

    from muse.checkpoint import init_model_root
    from serve.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(tmp_path / "root")
    init_model_root("tiny", root)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setenv(cluster.GCS_WAIT_ENV, "2")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a new process
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", root])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and time.monotonic() - start < 15, err
    assert err.strip().splitlines() == [
        f"muse serve: error: cannot join the Ray cluster at 127.0.0.1:{port} (RAY_ADDRESS): nothing answered there "
        "in 2 s ([Errno 111] Connection refused). Correct RAY_ADDRESS, or set RAY_ADDRESS=local to run on a Ray of "
        "this command's own"]


JOIN_WITHOUT_THE_TOKEN = """
from jobs.cluster import RayUnreachable, join_ray
try:
    join_ray()
except RayUnreachable as e:
    print("refused:", e)
"""


def test_a_cluster_that_refuses_the_token_says_where_the_token_goes(ray_session, tmp_path):
    """A process without the cluster's token (another user's, or RAY_AUTH_MODE unset) is refused by
    every GCS call; ray.init's error named only the address. The line says where the token goes, and
    the token itself is never printed."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        pytest.skip("this session's Ray runs without token authentication (RAY_AUTH_MODE=disabled)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"HOME": str(tmp_path), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            cluster.GCS_WAIT_ENV: "2", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", JOIN_WITHOUT_THE_TOKEN], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert "refused:" in run.stdout and "it refuses this process's authentication token" in run.stdout, run.stderr[-2000:]
    assert "Set RAY_AUTH_MODE=token" in run.stdout and "~/.ray/auth_token" in run.stdout
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    token = os.environ.get("RAY_AUTH_TOKEN") or open(token_file).read().strip()
    assert len(token) >= 16 and token not in run.stdout + run.stderr


def test_a_stale_record_of_a_ray_start_cluster_is_named_as_such(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(cluster.GCS_WAIT_ENV, "1")
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: address)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init called for a cluster that does not answer"))
    with pytest.raises(cluster.RayUnreachable, match=rf"at {address} \(the cluster `ray start` recorded on this node\): "
                       r"nothing answered there in 1 s .*Start it again \(a Ray that stopped without `ray stop`"):
        join_ray()
