"""Running a request's chain of deployment calls (serve/chain.py): each stage is called only once
what it reads has finished, so Serve's queue limit on it holds; timeouts, cancellation, retries on a
lost replica, and the errors a client gets."""

from __future__ import annotations

import asyncio
import types

import pytest

from serve.config import Limits, Sampling
from serve.images import EditInput
from serve.schemas import APIError, GenerationRequest
from serve.specs import Output
from serve_helpers import FakeStream


class _FakeResponse:
    """Stands in for a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, result=None, error: BaseException | None = None, delay: float = 0.0):
        self.result, self.error, self.delay, self.cancelled, self.done = result, error, delay, False, False

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        import asyncio

        await asyncio.sleep(self.delay)
        self.done = True
        if self.error is not None:
            raise self.error
        return self.result

    async def settle(self):  # what chain.finished does: wait, without the result
        try:
            await self._wait()
        except Exception:  # noqa: BLE001 - reaches the caller through the call that reads it
            pass

    def cancel(self):
        self.cancelled = True


def _listed(responses):
    """A chain that makes the calls `responses()` returns, without waiting between them."""
    async def chain(calls):
        for response in responses():
            calls.start(response)
    return chain


def test_chains_retry_a_lost_replica_at_most_max_retries_and_never_a_crashed_one(monkeypatch):
    import asyncio

    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    import serve.chain as chain_mod

    monkeypatch.setattr(chain_mod, "RETRY_BACKOFF_S", (0.01,))
    call = lambda chain, timeout=0.5, retries=1: asyncio.run(chain_mod.run_chain(_listed(chain), timeout, retries))  # noqa: E731

    attempts = []

    def flaky():
        attempts.append(1)
        first = len(attempts) == 1
        lost = ActorUnavailableError("unreachable", b"0" * 16)
        return [_FakeResponse(), _FakeResponse(error=lost if first else None, result="png")]

    assert call(flaky) == "png" and len(attempts) == 2

    hanging = [_FakeResponse(), _FakeResponse(delay=30)]
    with pytest.raises(APIError) as err:
        call(lambda: hanging)
    assert err.value.status == 504 and all(r.cancelled for r in hanging)

    with pytest.raises(APIError) as err:
        call(lambda: [_FakeResponse(error=BackPressureError(num_queued_requests=9, max_queued_requests=8))])
    assert err.value.status == 503 and err.value.code == "overloaded"

    attempts.clear()

    def always_lost():
        attempts.append(1)
        return [_FakeResponse(error=ActorUnavailableError("unreachable", b"0" * 16))]

    with pytest.raises(APIError) as err:  # one re-run, then 503
        call(always_lost, timeout=30)
    assert err.value.status == 503 and err.value.code == "replica_unavailable" and len(attempts) == 2

    attempts.clear()

    def crashing():  # the replica's process died while running the request: maybe the request did it
        attempts.append(1)
        return [_FakeResponse(error=ActorDiedError())]

    with pytest.raises(APIError) as err:  # re-run once (its batch-mates did not crash it), then refused
        call(crashing, timeout=30, retries=2)
    assert err.value.code == "replica_crashed" and len(attempts) == 2
    attempts.clear()
    with pytest.raises(APIError) as err:  # no re-runs allowed: not even one
        call(crashing, timeout=30, retries=0)
    assert err.value.code == "replica_crashed" and len(attempts) == 1

    attempts.clear()

    def crashed_once():
        attempts.append(1)
        return [_FakeResponse(error=ActorDiedError() if len(attempts) == 1 else None, result="png")]

    assert call(crashed_once, timeout=30) == "png" and len(attempts) == 2

    failed = RayTaskError("generate", "traceback", IndexError("index out of range"))
    with pytest.raises(APIError) as err:  # the model failed on this request: a 503, not a 500
        call(lambda: [_FakeResponse(error=failed)])
    assert err.value.status == 503 and err.value.code == "model_error"



def test_an_upstream_replica_lost_behind_serves_wrapper_is_a_lost_replica():
    from ray.serve.exceptions import RayServeException

    from serve.chain import crashed, replica_lost

    wrapped = RayServeException("Request to deployment 'SuperResGenerator' failed because an upstream actor "
                                "died before finishing a dependent task. Ray reported: ...")
    assert replica_lost(wrapped) is wrapped and not crashed(wrapped)  # re-run on a replacement
    # Where Serve quotes the upstream ActorDiedError, it is read as that error is: stopped, or crashed.
    quoted = ("Request to deployment 'Decoder' failed because an upstream actor died before finishing a "
              "dependent task. Ray reported: ... ray.exceptions.ActorDiedError: The actor died unexpectedly "
              "before finishing this task. ... The actor is dead because its worker process has died. ")
    assert crashed(RayServeException(quoted + "Worker exit type: SYSTEM_ERROR"))
    assert not crashed(RayServeException(quoted + "The actor is dead because it was killed by `ray.kill`."))
    assert replica_lost(RayServeException("something else")) is None  # other Serve errors are not retried


class _Handle:
    """Stands in for a DeploymentHandle: `handle.method.remote(*args)` records, for each call, whether
    every call it reads had finished when it was made. `handle.options(stream=True).stream.remote`
    answers a generator's events (admitted, done); `stream_errors` are raised, one per call, first."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.made, self.stream_errors = name, log, [], []
        self.stream_events: list = []  # each stream call's events (default: admitted, done)

    def options(self, **_):
        return self

    def __getattr__(self, method):
        def remote(*args):
            read = [a for a in args if isinstance(a, _FakeResponse)]
            self.log.append((f"{self.name}.{method}", all(a.done for a in read)))
            if method == "stream":
                given = self.stream_events.pop(0) if self.stream_events else None  # then the error, if any
                error = self.stream_errors.pop(0) if self.stream_errors else None
                return FakeStream(given or [{"kind": "admitted"}, {"kind": "done", "ids": "ids"}], error,
                                  error_after=len(given) if given else 0)
            self.made.append(_FakeResponse(result=[b"png"], delay=0.02))
            return self.made[-1]
        return types.SimpleNamespace(remote=remote)


def _ingress(log: list):
    from serve.api import Ingress

    ing = types.SimpleNamespace(sampling=Sampling(), limits=Limits(), lo_side=64, hi_side=128, lo_tokens=8,
                                **{name: _Handle(name, log) for name in ("text", "base", "superres", "decoder")})
    for method in ("decodes", "call", "generate", "edit"):
        setattr(ing, method, types.MethodType(getattr(Ingress, method), ing))
    ing.hi_tokens, ing.usage = 16, lambda *a, **k: {}
    return ing


def _stream(ing, edit=None, partial_images: int = 0):
    """Open a stream through super-res and read it to its end: its events' names."""
    from serve.streaming import StreamRequest, open_stream

    lo, hi = ing.decodes(1, 1, None, None, None)

    async def read():
        events = await open_stream(ing, StreamRequest("a red circle", None, "hi", 1, lo, hi, partial_images, None,
                                                      edit), "http://test", Output())
        return [e.split("\n", 1)[0] async for e in events]
    return asyncio.run(read())


@pytest.mark.parametrize("mask_free", [False, True])
def test_each_stage_is_called_once_what_it_reads_has_finished(monkeypatch, mask_free):
    """Serve checks a deployment's max_queued_requests when a call is made, but counts the call as
    queued only once its arguments are ready: a super-res call made on an unfinished base response
    would pass every check and queue without bound."""
    import serve.chain as chain_mod

    monkeypatch.setattr(chain_mod, "finished", lambda response: response.settle())
    log: list = []
    ing = _ingress(log)
    request = GenerationRequest(prompt="a red circle")
    assert asyncio.run(ing.generate(request, "hi", 1, Output())) == [b"png"]
    assert log == [("text.encode", True), ("base.generate", True), ("superres.generate", True),
                   ("decoder.decode", True)]

    log.clear()
    edit = EditInput(images={"lo": "lo pixels", "hi": "hi pixels"}, regenerate=None if mask_free else "mask")
    lo, hi = ing.decodes(1, 1, None, None, None)
    assert asyncio.run(ing.edit(edit, "a blue square", None, "hi", lo, hi, Output())) == [b"png"]
    assert [name for name, _ in log] == ["text.encode", "decoder.encode", f"base.{'edit' if mask_free else 'generate'}",
                                         "decoder.encode", "superres.generate", "decoder.decode"]
    assert all(ready for _, ready in log), log


@pytest.mark.parametrize("mask_free", [False, True])
def test_streams_call_each_stage_once_what_it_reads_has_finished(monkeypatch, mask_free):
    """As plain requests: a stream's base call made on the unfinished text encoding (or an edit's
    source tokens) would pass Serve's queue check and then queue without bound."""
    import serve.chain as chain_mod

    monkeypatch.setattr(chain_mod, "finished", lambda response: response.settle())
    log: list = []
    ing = _ingress(log)
    assert _stream(ing) == ["event: image_generation.completed"]
    assert log == [("text.encode", True), ("base.stream", True), ("superres.stream", True),
                   ("decoder.decode", True)]

    log.clear()
    edit = EditInput(images={"lo": "lo pixels", "hi": "hi pixels"}, regenerate=None if mask_free else torch_mask())
    assert _stream(ing, edit) == ["event: image_edit.completed"]
    assert [name for name, _ in log] == ["text.encode", "decoder.encode", "decoder.encode",
                                         "base.edit" if mask_free else "base.stream", "superres.stream",
                                         "decoder.decode"]
    assert all(ready for _, ready in log), log


def torch_mask():
    import torch

    return torch.ones(8, 8, dtype=torch.bool)


def test_a_stream_whose_replica_is_lost_before_its_first_event_is_rerun_as_a_plain_request(monkeypatch):
    """Until its first event a stream can still be re-run on a replacement, as a plain request is:
    after a lost replica (max_retries), and after a crash once; then it is answered with a plain
    request's codes."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    import serve.chain as chain_mod

    monkeypatch.setattr(chain_mod, "finished", lambda response: response.settle())
    monkeypatch.setattr(chain_mod, "RETRY_BACKOFF_S", (0.01,))
    log: list = []
    ing = _ingress(log)
    ing.base.stream_errors = [ActorUnavailableError("unreachable", b"0" * 16)]
    assert _stream(ing) == ["event: image_generation.completed"]
    assert [name for name, _ in log].count("base.stream") == 2

    ing.base.stream_errors = [ActorDiedError()]  # crashed once: re-run
    log.clear()
    assert _stream(ing) == ["event: image_generation.completed"]
    assert [name for name, _ in log].count("base.stream") == 2
    for errors, code in (([ActorUnavailableError("unreachable", b"0" * 16)] * 2, "replica_unavailable"),
                         ([ActorDiedError()] * 2, "replica_crashed")):
        log.clear()
        ing.base.stream_errors = list(errors)
        with pytest.raises(APIError) as err:
            _stream(ing)
        assert err.value.status == 503 and err.value.code == code
        assert [name for name, _ in log].count("base.stream") == len(errors)  # max_retries = 1


def test_a_stream_admitted_then_lost_before_any_event_is_rerun_and_after_one_is_not(monkeypatch):
    """Admitted (its 200 sent) but no event yet: the re-run's images are the same, so it is re-run
    transparently. After a preview it ends with an error event instead (what was shown cannot be
    taken back)."""
    from ray.exceptions import ActorUnavailableError

    import serve.chain as chain_mod

    monkeypatch.setattr(chain_mod, "finished", lambda response: response.settle())
    monkeypatch.setattr(chain_mod, "RETRY_BACKOFF_S", (0.01,))
    log: list = []
    ing = _ingress(log)
    lost = ActorUnavailableError("unreachable", b"0" * 16)
    ing.base.stream_events = [[{"kind": "admitted"}]]  # then lost
    ing.base.stream_errors = [lost]
    assert _stream(ing) == ["event: image_generation.completed"]
    assert [name for name, _ in log].count("base.stream") == 2

    log.clear()
    previews = [{"kind": "preview", "step": i, "steps": 30, "ids": "ids"} for i in range(30)]  # some are sent
    ing.base.stream_events = [[{"kind": "admitted"}, *previews]]
    ing.base.stream_errors = [lost]
    events = _stream(ing, partial_images=3)
    assert "event: image_generation.partial_image" in events and events[-1] == "event: error"
    assert [name for name, _ in log].count("base.stream") == 1


def test_a_stream_that_ends_early_cancels_the_calls_it_made(monkeypatch):
    """A model failure after the stream's first event ends it with an error event, and the calls it
    made that may still be queued (the decoder's) are cancelled instead of running for no one."""
    import serve.chain as chain_mod

    monkeypatch.setattr(chain_mod, "finished", lambda response: response.settle())
    log: list = []
    ing = _ingress(log)
    ing.superres.stream_errors = [ValueError("bad tokens")]
    assert _stream(ing) == ["event: error"]
    assert ing.text.made and all(r.cancelled for r in ing.text.made)

    ing.superres.stream_errors = []
    _stream(ing)
    assert not any(r.cancelled for r in ing.text.made[1:] + ing.decoder.made)  # a finished stream cancels nothing
