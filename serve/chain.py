"""Running one request's chain of deployment calls: its timeout, its cancellation, and its retries.

A chain is a function that starts the calls (text -> base -> super-res -> decoder, each handed the
previous call's DeploymentResponse) and returns them, the final one last. `run_chain` awaits the
final one within the request timeout and maps what can go wrong to OpenAI-shaped errors:

    timeout                         every call cancelled, 504
    caller gone (cancelled)         every call cancelled (the schedulers drop their rows)
    a queue is full (BackPressure)  503 + Retry-After, at once
    a replica was lost              re-run on a replacement, at most `max_retries` times; 503 after
    a replica crashed under it      not re-run (the request may be what crashed it), 503
    the model failed on it          503 (never a 500: the server itself is fine)

The timeout, the crash and the model's failure would repeat: their answers carry `x-should-retry:
false`, which OpenAI's SDKs read (they resend any other 5xx).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                  ReplicaUnavailableError)

from serve.schemas import APIError

logger = logging.getLogger("ray.serve")
RETRY_BACKOFF_S = (0.5, 1.0)  # waits before the re-runs after a replica was lost
# Error codes of failures that would repeat if the client sent the request again.
NOT_RETRIED = ("timeout", "replica_crashed", "model_error")


async def run_chain(chain: Callable[[], list], timeout_s: float, max_retries: int = 1) -> Any:
    """The final call's result of `chain()`, re-running the chain after a lost replica."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        calls = chain()
        try:
            return await asyncio.wait_for(_result(calls[-1]), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            _cancel(calls)
            raise APIError(504, f"the request took longer than {timeout_s:g} s", type="server_error",
                           code="timeout") from None
        except asyncio.CancelledError:  # the client went away: free the model work it holds
            _cancel(calls)
            raise
        except BackPressureError:
            _cancel(calls)
            raise overloaded() from None
        except Exception as e:  # noqa: BLE001 - sorted below
            _cancel(calls)
            lost = replica_lost(e)
            if lost is None:
                raise model_failed(e) from e
            if crashed(lost):
                raise APIError(503, "a model replica crashed while running this request; it is not retried",
                               type="server_error", code="replica_crashed") from None
            wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
            if attempt >= max_retries or time.monotonic() + wait > deadline:
                raise APIError(503, "a model replica was lost and no replacement answered; retry",
                               type="server_error", code="replica_unavailable") from None
            attempt += 1
            logger.warning("a replica was lost under a request (%s); re-running it", type(lost).__name__)
            await asyncio.sleep(wait)


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
    as opposed to being stopped (ray.kill, downscaling, a drained node) or unreachable."""
    if not isinstance(e, ActorDiedError) or getattr(e, "preempted", False):
        return False
    message = str(e)
    return not any(s in message for s in ("ray.kill", "never ran", "intended", "INTENDED"))


def _cancel(calls: list) -> None:
    for response in calls:
        try:
            response.cancel()
        except Exception:  # noqa: BLE001 - a call that already failed (its replica died) has nothing to free
            logger.debug("cancel of a failed call raised", exc_info=True)


async def _result(response: Any) -> Any:
    return await response
