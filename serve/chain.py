"""Running one request's chain of deployment calls: its timeout, its cancellation, and its retries.

A chain is a coroutine function that makes the calls (text -> base -> super-res -> decoder, each
handed the DeploymentResponses it reads) through a `Calls`, the final one last, and makes each call
only once the calls it reads have finished (`Calls.ready`). Serve checks a deployment's
`max_queued_requests` when a call is made but counts the call as queued only once its arguments are
ready, so a call made earlier, on an unfinished response, would pass every check and then queue
without bound; made after, it meets the limit. The results stay in the object store: only the final
image bytes come back here. `run_chain` runs the chain and awaits the final call within the request
timeout, and maps what can go wrong to OpenAI-shaped errors:

    timeout                         every call cancelled, 504
    caller gone (cancelled)         every call cancelled (the schedulers drop their rows)
    a queue is full (BackPressure)  503 + Retry-After, at once
    a replica was lost              re-run on a replacement, at most `max_retries` times; 503 after
    a replica crashed under it      re-run once (its batch-mates did not crash it); a second crash, 503
    the model failed on it          503 (never a 500: the server itself is fine)

The timeout, the crash and the model's failure would repeat: their answers carry `x-should-retry:
false`, which OpenAI's SDKs read (they resend any other 5xx).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                  ReplicaUnavailableError)

from serve.schemas import APIError

logger = logging.getLogger("ray.serve")
RETRY_BACKOFF_S = (0.5, 1.0)  # waits before the re-runs after a replica was lost
# Error codes of failures that would repeat if the client sent the request again.
NOT_RETRIED = ("timeout", "replica_crashed", "model_error")


# Threads that wait for calls to finish (ray.wait blocks; it is asked again every WAIT_SLICE_S, so a
# thread is back within that time of a cancelled request). Waits past this many queue for a thread.
_WAITERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="muse-chain-wait")
WAIT_SLICE_S = 0.5


class Calls:
    """The calls one run of a chain has made, in order: what a timeout or a cancellation cancels."""

    def __init__(self) -> None:
        self.made: list = []

    def start(self, response):
        self.made.append(response)
        return response

    async def ready(self, *responses) -> None:
        """Wait until these calls have finished, or failed (a failure reaches the caller through the
        call that reads them), without fetching their results into this process."""
        for response in responses:
            await finished(response)


async def finished(response) -> None:
    """Wait until a DeploymentResponse's call has finished. Its ObjectRef (Serve's developer API) is
    waited on with `fetch_local=False`: the result is not pulled here. Raises BackPressureError when
    Serve refused the call."""
    ref = await response._to_object_ref()
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(_WAITERS, _ready, ref):
        pass


def _ready(ref) -> bool:
    done, _ = ray.wait([ref], timeout=WAIT_SLICE_S, fetch_local=False)
    return bool(done)


async def run_chain(chain: Callable[[Calls], Awaitable[None]], timeout_s: float, max_retries: int = 1) -> Any:
    """The final call's result of `chain(calls)`, re-running the chain after a lost replica."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        made = Calls()
        calls = made.made

        async def whole():
            await chain(made)
            return await calls[-1]

        try:
            return await asyncio.wait_for(whole(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            cancel_calls(calls)
            raise APIError(504, f"the request took longer than {timeout_s:g} s", type="server_error",
                           code="timeout") from None
        except asyncio.CancelledError:  # the client went away: free the model work it holds
            cancel_calls(calls)
            raise
        except BackPressureError:
            cancel_calls(calls)
            raise overloaded() from None
        except Exception as e:  # noqa: BLE001 - sorted below
            cancel_calls(calls)
            lost = replica_lost(e)
            if lost is None:
                raise model_failed(e) from e
            wait = retry_wait(lost, attempt, max_retries, deadline)
            attempt += 1
            await asyncio.sleep(wait)


def retry_wait(lost: BaseException, attempt: int, max_retries: int, deadline: float) -> float:
    """Seconds to wait before re-running a request whose replica was `lost` (after `attempt` re-runs),
    or the 503 that ends it, out of re-runs or of time. A crash is re-run once: the replica's batch
    held other requests than the one that may have crashed it; crashing a second replica, it is
    answered replica_crashed and never sent again."""
    wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
    if crashed(lost) and (attempt > 0 or max_retries == 0 or time.monotonic() + wait > deadline):
        raise crash_error() from None
    if attempt >= max_retries or time.monotonic() + wait > deadline:
        raise APIError(503, "a model replica was lost and no replacement answered; retry",
                       type="server_error", code="replica_unavailable") from None
    logger.warning("a replica was lost under a request (%s); re-running it", type(lost).__name__)
    return wait


def crash_error() -> APIError:
    return APIError(503, "a model replica crashed while running this request; it is not retried",
                    type="server_error", code="replica_crashed")


def overloaded() -> APIError:
    return APIError(503, "the server is at capacity; retry shortly", type="server_error", code="overloaded")


def model_failed(e: BaseException) -> APIError:
    """A deployment raised on this request (bad input that got past validation, out of memory):
    503 with the error's type; other requests are unaffected."""
    if isinstance(e, APIError):
        return e
    cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
    logger.warning("a model call failed: %s: %s", type(cause).__name__, str(cause)[:300])
    return APIError(503, f"generation failed: {type(cause).__name__}", type="server_error", code="model_error")


def replica_lost(e: BaseException | None) -> BaseException | None:
    """The error saying a replica died (or went away) under this request, here or in a deployment
    it called; None when the failure is something else."""
    lost = (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError, ReplicaUnavailableError)
    while e is not None:
        if isinstance(e, lost):
            return e
        # Serve's router wraps "an upstream actor died before finishing a dependent task" (the replica
        # that produced this call's input) in a RayServeException, whose cause may not survive the trip.
        if isinstance(e, RayServeException) and "actor died" in str(e):
            return e
        e = e.cause if isinstance(e, RayTaskError) else e.__cause__
    return None


def crashed(e: BaseException) -> bool:
    """The replica's process died on its own while running the call (a segfault, the OOM killer),
    as opposed to being stopped (ray.kill, downscaling, a drained node) or unreachable. An upstream
    replica's death reaches the call that reads its result as Serve's "an upstream actor died",
    which quotes the ActorDiedError: read the same way, so a crash is one whichever stage died."""
    upstream = isinstance(e, RayServeException) and "ActorDiedError" in str(e)
    if not (isinstance(e, ActorDiedError) or upstream) or getattr(e, "preempted", False):
        return False
    message = str(e)
    return not any(s in message for s in ("ray.kill", "never ran", "intended", "INTENDED"))


def cancel_calls(calls: list) -> None:
    for response in calls:
        try:
            response.cancel()
        except Exception:  # noqa: BLE001 - a call that already failed (its replica died) has nothing to free
            logger.debug("cancel of a failed call raised", exc_info=True)
