"""Joining Ray: one way for every entry point (tokenize, the training jobs, the demo, serve).

In this order:
1. RAY_ADDRESS (set by `ray job submit`, or by hand): join that cluster;
2. a cluster started on this node with `ray start` (the address it records, which `ray.init()` finds
   by itself): join it;
3. otherwise start a local Ray for this process.

A cluster is sized by whoever started it, so `num_cpus` and the other start-up options apply to a
local instance only; the workers' environment goes to both. Never `address="auto"`: beyond the
`ray start` cluster it falls back to any Ray process on the machine, e.g. another user's test run.
A cluster that does not answer, or refuses this process's token, is `RayUnreachable` within Ray's
GCS wait (20 s), where ray.init would try for about 14 minutes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

# Driver settings of a local instance. Ray Train's controller (which takes these from the driver)
# polls its workers every 2 s by default, and a stage's start and end each wait for polls: on one node
# a poll is cheap, and at 0.5 s an empty stage takes ~4 s less (benchmarks/train_start.py).
LOCAL_DRIVER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def use_local_driver_env() -> None:
    """LOCAL_DRIVER_ENV into this process's environment, before it starts a local Ray (a value the
    user set stays)."""
    for key, value in LOCAL_DRIVER_ENV.items():
        os.environ.setdefault(key, value)


def cluster_address() -> str | None:
    """The cluster to join: RAY_ADDRESS, else the one `ray start` last started on this node, else None."""
    address = os.environ.get("RAY_ADDRESS")
    if address:  # "local": Ray's name for a new instance here, which is ours to start with our options
        return None if address == "local" else address
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # a private API that a later Ray may move: RAY_ADDRESS still names a cluster
        log.warning("this Ray cannot say which cluster `ray start` started here: set RAY_ADDRESS to join it")
        return None
    return read_ray_address() or None


# Set by `ray job submit` in the driver's environment: the job's config, its runtime_env included.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# "1" or "0": whether the autoscaler can add nodes, for a cluster whose autoscaler Ray does not record.
GROWS_ENV = "MUSE_CLUSTER_GROWS"
# Where `ray up` leaves the autoscaler's config on the head node (Ray Tune reads it the same way).
RAY_UP_CONFIG = "~/ray_bootstrap_config.yaml"


def cluster_may_grow() -> bool:
    """Whether the joined Ray may get more nodes than it has now: MUSE_CLUSTER_GROWS where set; else
    the autoscaler's node groups as Ray records them, against what is up; else whether this is the head
    of a `ray up` cluster. Failing those, a RAY_ADDRESS the user set means a remote cluster with an
    autoscaler, but not the one Ray's job supervisor sets for every submitted job, nor "local" (a new
    Ray in this process): a job on a plain `ray start` cluster, a local Ray, or a `ray start` cluster
    found on this node is taken as it is."""
    said = os.environ.get(GROWS_ENV)
    if said in ("0", "1"):
        return said == "1"
    most = _autoscaler_limits()
    if most is not None:
        import ray

        have = ray.cluster_resources()
        return any(amount > have.get(name, 0) for name, amount in most.items())
    if os.path.exists(os.path.expanduser(RAY_UP_CONFIG)):
        return True
    address = os.environ.get("RAY_ADDRESS", "")
    return bool(address) and address != "local" and JOB_CONFIG_ENV not in os.environ  # "local": a new Ray here


def _autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource the autoscaler's node groups can hold, as the cluster's GCS records
    them (what Ray Train checks a worker group against); None where none is recorded."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # noqa: BLE001 - a private API: without it, the checks below decide
        return None


def without_job_env_vars(env: dict[str, str] | None) -> dict[str, str]:
    """`env` less the variables a submitted job's runtime_env sets already (`ray job submit
    --runtime-env-json '{"env_vars": ...}'`): Ray refuses to merge a driver's runtime_env that names the
    same variable, even with the same value, and the job's reach every worker anyway."""
    env = dict(env or {})
    try:
        job_env = (json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        job_env = {}
    return {key: value for key, value in env.items() if key not in job_env}


class RayUnreachable(ConnectionError):
    """The cluster to join does not answer, or refuses this process's authentication token."""


# How long a cluster may not answer before a command gives up: Ray's own budget for reaching a GCS
# (RAY_gcs_server_port_wait_time_s, else ~20 tries a second apart), where ray.init would go on for
# about 14 minutes (each try waits on a 40 s timeout) printing warnings.
GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
GCS_WAIT_S = 20.0


def check_reachable(address: str, source: str) -> None:
    """Raise RayUnreachable unless something accepts a connection at `address` (host:port, or
    ray://host:port) within the GCS wait; a name Ray resolves itself ("auto") passes."""
    import socket
    import time

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        wait = max(1.0, float(os.environ.get(GCS_WAIT_ENV) or GCS_WAIT_S))
    except ValueError:
        wait = GCS_WAIT_S
    deadline, error = time.monotonic() + wait, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, wait)):
                return
        except OSError as e:
            error = e
            time.sleep(1.0)
    way_out = ("correct RAY_ADDRESS" if source == "RAY_ADDRESS" else
               "start it again (a Ray that stopped without `ray stop` leaves this record behind)")
    raise RayUnreachable(f"cannot join the Ray cluster at {address} ({source}): nothing answered there in "
                         f"{wait:.0f} s ({error}). {way_out[0].upper() + way_out[1:]}, or set RAY_ADDRESS=local "
                         "to run on a Ray of this command's own")


def _why_not_joined(address: str, source: str, error: BaseException) -> str:
    import ray.exceptions

    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    # ray.init gives up after its tries with a RuntimeError that quotes the last one's traceback.
    refused = any(isinstance(e, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(e) for e in chain)
    if refused:  # the token itself is never shown
        return (f"cannot join the Ray cluster at {address} ({source}): it refuses this process's authentication "
                "token. Set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN_PATH (a file), "
                "RAY_AUTH_TOKEN or ~/.ray/auth_token; `ray get-auth-token` on its head node prints it")
    return f"cannot join the Ray cluster at {address} ({source}): {error}"


def join_ray(env: dict[str, str] | None = None, *, num_cpus: int | None = None,
             local_env: dict[str, str] | None = None, quiet: bool = True, **local: Any) -> bool:
    """Connect this process to Ray as the module says, unless it is connected already. `env`: the
    workers' environment; `local_env`, `num_cpus` and `local` (other `ray.init` options): for a local
    instance only. `quiet`: the console settings of `jobs.progress.ray_init_kwargs`. Returns whether
    a local instance was started (the caller's to shut down)."""
    import ray

    from jobs.progress import ray_init_kwargs

    if ray.is_initialized():
        return False
    console = ray_init_kwargs() if quiet else {}
    address = cluster_address()
    if address is not None:
        source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the cluster `ray start` recorded on this node"
        check_reachable(address, source)
        try:
            ray.init(address=address, runtime_env={"env_vars": without_job_env_vars(env)}, **console)
        except ConnectionError as e:
            raise RayUnreachable(_why_not_joined(address, source, e)) from None
        stop_on_sigterm()
        return False
    use_local_driver_env()
    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": dict(env or {}) | dict(local_env or {})},
             **local, **console)
    stop_on_sigterm()
    return True


def stop_on_sigterm() -> None:
    """SIGTERM (what `ray job stop` sends a job's driver) raises KeyboardInterrupt, as Ctrl-C does, so
    a job stopped either way ends with its own line. ray.init's handler exits at once instead, and
    Ray kills a stopped driver a few seconds later. Main thread only, as Python requires."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def in_job_package(path: str) -> bool:
    """Whether a local path lies in a submitted job's working directory: Ray's unpacked copy of
    `--working-dir` (a `_ray_pkg_<hash>` folder), where a relative path given to the job lands."""
    cwd = os.getcwd()
    if JOB_CONFIG_ENV not in os.environ or "_ray_pkg_" not in os.path.basename(cwd):
        return False
    return os.path.abspath(path).startswith(cwd.rstrip("/") + "/")


# "1": local paths lie on a filesystem every node mounts at the same place (EFS, FSx, NFS).
SHARED_FS_ENV = "MUSE_SHARED_FS"


class LocalPathRefused(ValueError):
    """A local path given to a job on a Ray of several nodes, where it names a different disk on each."""


def check_shared_paths(paths: dict[str, str | None]) -> None:
    """Refuse local paths (`paths`: flag -> path) on a joined Ray that has several nodes: tasks, actors
    and workers on other nodes would read and write their own disks (shards scattered, checkpoints
    lost with the node). On a cluster that may still grow, only warn. MUSE_SHARED_FS=1 lifts both."""
    import ray

    from jobs.progress import say
    from muse import storage

    local = {flag: path for flag, path in paths.items() if path and not storage.is_s3(path)}
    in_package = {flag: path for flag, path in local.items() if in_job_package(path)}
    if in_package:
        named = ", ".join(f"{flag} {path}" for flag, path in in_package.items())
        raise LocalPathRefused(f"{named} lies in this job's copy of its --working-dir, which Ray deletes once the "
                               "job is done: give an absolute path on storage every node shares, or s3://")
    if not local or os.environ.get(SHARED_FS_ENV) == "1" or not ray.is_initialized():
        return
    named = ", ".join(f"{flag} {path}" for flag, path in local.items())
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        raise LocalPathRefused(f"this Ray has {nodes} nodes and {named} is local, a different disk on each node: "
                               f"give s3:// paths (or set {SHARED_FS_ENV}=1 where every node mounts it)")
    if cluster_may_grow():
        say(f"warning: {named} is local: if the autoscaler adds nodes, work on them reads and writes their own "
            f"disks (give s3:// paths, or set {SHARED_FS_ENV}=1 where every node mounts it)")
