"""A model replica killed mid-test is replaced by Serve, and requests (the one in flight included,
which the ingress re-runs on the replacement) succeed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from serve_helpers import APP, TEST_ARGS, assert_same_image, pil_array, png_array


def _replica_actor(deployment: str, replica_id: str):
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].endswith(f"{APP}#{deployment}#{replica_id}"):
            return ray.get_actor(entry["name"], namespace=entry["namespace"])
    raise AssertionError(f"no actor for replica {replica_id} of {deployment}")


def _held(stats: dict) -> bool:
    """The replica holds a request: queued in its scheduler or decoding."""
    return stats["in_flight_rows"] > 0 or stats["waiting"] > 0


def test_killed_base_replica_is_replaced_and_requests_succeed(muse_app, pipe):
    base = serve.get_deployment_handle("BaseGenerator", app_name=APP)
    before = base.stats.remote().result()["replica"]
    body = dict(prompt="a white moon", size="64x64", seed=21, steps=100, response_format="b64_json")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(muse_app.generate, **body)
        deadline = time.monotonic() + 60
        while not _held(base.stats.remote().result()):  # kill only once the replica holds the request
            assert not in_flight.done(), in_flight.result().text
            assert time.monotonic() < deadline, "the request never reached the base replica"
        ray.kill(_replica_actor("BaseGenerator", before), no_restart=True)
        r = in_flight.result(timeout=150)
    assert r.status_code == 200, r.text
    want = pipe("a white moon", steps=100, seed=21, superres=False)
    assert_same_image(png_array(r.json()["data"][0]["b64_json"]), pil_array(want[0]))

    stats = base.stats.remote().result()
    assert stats["replica"] != before, "Serve did not start a new replica"
    # The request was re-run on the replacement, not finished on the killed replica before the kill.
    assert stats["outcomes"] == {"completed": 1}, stats["outcomes"]
    for seed in (1, 2):  # and later requests, through super-res too, keep working
        r = muse_app.generate(prompt="a white moon", size="128x128", seed=seed, response_format="b64_json")
        assert r.status_code == 200, r.text
        want = pipe("a white moon", steps=TEST_ARGS["sampling"]["steps"],
                    superres_steps=TEST_ARGS["sampling"]["superres_steps"], seed=seed)
        assert_same_image(png_array(r.json()["data"][0]["b64_json"]), pil_array(want[0]))


def test_a_base_replica_that_dies_under_a_request_is_a_crash_re_run_once(muse_app, pipe):
    """A replica process killed (SIGKILL, as the OOM killer does) while it holds a request: a crash,
    whichever stage died, and the request is re-run once on the replacement (the replica's batch held
    other requests than the one that may have crashed it; a second crash is answered 503
    replica_crashed with x-should-retry false: tests/serve/test_chain.py)."""
    import os
    import signal

    base = serve.get_deployment_handle("BaseGenerator", app_name=APP)
    before = base.stats.remote().result()["replica"]
    pid = ray.get(_replica_actor("BaseGenerator", before).__ray_call__.remote(lambda replica: os.getpid()))
    body = dict(prompt="a white moon", size="64x64", seed=22, steps=100, response_format="b64_json")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(muse_app.generate, **body)
        deadline = time.monotonic() + 60
        while not _held(base.stats.remote().result()):
            assert not in_flight.done(), in_flight.result().text
            assert time.monotonic() < deadline, "the request never reached the base replica"
        os.kill(pid, signal.SIGKILL)
        r = in_flight.result(timeout=150)
    assert r.status_code == 200, r.text
    want = pipe("a white moon", steps=100, seed=22, superres=False)
    assert_same_image(png_array(r.json()["data"][0]["b64_json"]), pil_array(want[0]))
    assert base.stats.remote().result()["replica"] != before, "Serve did not start a new replica"
    deadline = time.monotonic() + 120
    while True:  # Serve replaces it, and requests work again
        r = muse_app.generate(prompt="a white moon", size="64x64", seed=1, response_format="b64_json")
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(1)
