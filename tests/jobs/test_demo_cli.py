"""`python -m jobs.demo` on its own terms: a bad --set is a one-line usage error before Ray starts or
any corpus is written, and on a cluster it joined the demo removes only its own Serve app ("muse-demo"),
never the others' (serve.shutdown() used to delete every app). Ray, training and Serve are faked."""

from __future__ import annotations

import os

import pytest

from jobs import demo


def test_a_bad_override_is_a_usage_error_before_ray_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "join_ray", lambda *a, **k: pytest.fail("Ray started before the config was checked"))
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--output", str(out), "--set", "base.run.max_step=5"])  # max_steps misspelt
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "max_step" in err and "Traceback" not in err
    assert not out.exists()  # no corpus written
    with pytest.raises(ValueError, match="max_step"):  # run_demo itself checks first too
        demo.run_demo(str(out), overrides=("base.run.max_step=5",))
    assert not out.exists()


class FakeServe:
    """ray.serve on a joined cluster where someone else's app runs."""

    def __init__(self):
        self.apps, self.shut_down = {"someone-elses-app"}, False
        self.ran, self.deleted = [], []

    def start(self, **kwargs):
        pass

    def run(self, app, name, route_prefix, blocking):
        self.apps.add(name)
        self.ran.append(name)

    def delete(self, name):
        self.apps.discard(name)
        self.deleted.append(name)

    def shutdown(self):
        self.shut_down, self.apps = True, set()


@pytest.fixture
def joined(monkeypatch, tmp_path):
    """A demo output whose corpora exist, on a joined cluster (join_ray says it started nothing)."""
    import ray.serve

    import jobs.all
    import serve.app

    fake = FakeServe()
    for name in ("start", "run", "delete", "shutdown"):
        monkeypatch.setattr(ray.serve, name, getattr(fake, name))
    monkeypatch.setattr(demo, "join_ray", lambda *a, **k: False)
    monkeypatch.setattr(jobs.all, "train_all", lambda *a, **k: {})
    monkeypatch.setattr(serve.app, "build_app", lambda args: "app")
    out = tmp_path / "demo"
    for folder in ("corpus", "images"):
        os.makedirs(out / folder)
        (out / folder / "holdout.json").write_text("{}")
    return fake, str(out)


def test_on_a_joined_cluster_the_demo_removes_only_its_own_app(joined, monkeypatch):
    fake, out = joined

    def unhealthy(url, timeout=300.0):
        raise TimeoutError("the Serve app did not become healthy")

    monkeypatch.setattr(demo, "wait_healthy", unhealthy)
    with pytest.raises(TimeoutError):
        demo.run_demo(out)
    assert fake.ran == fake.deleted == [demo.DEMO_APP]  # deployed, then removed
    assert fake.apps == {"someone-elses-app"} and not fake.shut_down


def test_a_demo_that_fails_before_serving_leaves_serve_alone(joined, monkeypatch):
    import jobs.all

    fake, out = joined

    def fails(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(jobs.all, "train_all", fails)
    with pytest.raises(RuntimeError, match="training failed"):
        demo.run_demo(out)
    assert fake.ran == [] and fake.apps == {"someone-elses-app"} and not fake.shut_down


def test_a_corpus_written_with_other_settings_is_not_silently_reused(tmp_path):
    from jobs.demo import check_reused_corpus
    from jobs.preflight import RunRefused
    from muse.data.synthetic import write_corpus

    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 8, size=64, grid=8, layout="lines")
    check_reused_corpus(corpus, n=8, size=64, grid=8, layout="lines")  # the same: reused
    with pytest.raises(RunRefused, match=r"written with n 8 \(asked: 16\), layout lines \(asked: scattered\)"):
        check_reused_corpus(corpus, n=16, size=64, grid=8, layout="scattered")
