"""Draining every ingress replica before `muse serve` stops its app.

Serve's handles reach one replica per call, so a drain sent through one reaches one. Instead the
stopping CLI creates a named actor, the drain board, and each ingress replica looks for it once a
second: once it sees it, the replica refuses new image requests (`Admission.draining`) and reports
its requests in flight there until it stops. The CLI waits until every running replica has reported
none left. A board that goes away (its CLI killed) ends the drain: the replicas take requests again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import ray

from serve.guard import Admission

NAMESPACE = "muse"
LOOK_EVERY_S = 1.0  # how soon an idle replica notices a drain
REPORT_EVERY_S = 0.2  # how often a draining replica reports its requests in flight
STATUS_EVERY_S = 1.0  # how often the drain asks Serve's controller how many replicas run (one RPC each)

logger = logging.getLogger("ray.serve")


def board_name(app_name: str) -> str:
    return f"drain:{app_name}"


@ray.remote(num_cpus=0, max_concurrency=64)
class DrainBoard:
    """Each ingress replica's latest count of image requests in flight, by replica."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}

    def report(self, replica: str, in_flight: int) -> None:
        self.in_flight[replica] = in_flight

    def reports(self) -> dict[str, int]:
        return dict(self.in_flight)


def _find_board(app_name: str):
    try:
        return ray.get_actor(board_name(app_name), namespace=NAMESPACE)
    except ValueError:  # no drain asked for
        return None


async def watch_for_drain(app_name: str, admission: Admission, find=_find_board) -> None:
    """Runs in each ingress replica for its whole life (see the module's docstring)."""
    replica, board = uuid.uuid4().hex, None
    while True:
        if board is None:
            board = await asyncio.to_thread(find, app_name)
        if board is not None:
            admission.draining = True  # before the report, so a report of 0 stays 0
            try:
                await board.report.remote(replica, admission.in_flight)
            except ray.exceptions.RayActorError:
                logger.warning("the drain was given up (its board is gone); taking requests again")
                board, admission.draining = None, False
        await asyncio.sleep(REPORT_EVERY_S if board is not None else LOOK_EVERY_S)


def running_ingress_replicas(app_name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or "Ingress" not in app.deployments:
        return 0
    return app.deployments["Ingress"].replica_states.get("RUNNING", 0)


def drain(app_name: str, timeout_s: float, running=running_ingress_replicas,
          waiting=lambda in_flight: None, every_s: float = 5.0) -> tuple[ray.actor.ActorHandle, int]:
    """Start the drain and wait, at most `timeout_s`, until every running ingress replica has reported
    none in flight; `waiting(in_flight)` every `every_s` meanwhile. Returns the board (kill it once the
    app is deleted) and how many were left."""
    board = DrainBoard.options(name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True).remote()
    deadline = time.monotonic() + timeout_s
    said = asked = time.monotonic()
    replicas = running(app_name)
    while True:
        reports = ray.get(board.reports.remote())
        if time.monotonic() - said >= every_s:
            waiting(sum(reports.values()))
            said = time.monotonic()
        if time.monotonic() - asked >= STATUS_EVERY_S:
            replicas, asked = running(app_name), time.monotonic()
        # A replica that died keeps its last report; the ones running now must each have said 0.
        if sum(1 for n in reports.values() if n == 0) >= replicas:
            return board, 0
        if time.monotonic() >= deadline:
            return board, sum(reports.values())
        time.sleep(REPORT_EVERY_S)
