"""`muse serve`'s command line (the flags, the config and the model root, checked before Ray starts)
and a Serve config's args on their way to build_app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.config import load_args

REPO = Path(__file__).resolve().parents[2]


def test_cli_mistakes_are_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    """Every mistake the flags, the config or the model root can hold is one `muse serve: error:` line
    and exit status 2, found before Ray and Serve start (which take seconds and print their own lines)."""
    import socket

    import jobs.cluster
    from muse.checkpoint import init_model_root
    from serve.cli import main, parse_args, port_taken

    _, args = parse_args(["--checkpoint", "/m", "--port", "9000"])
    assert (args.checkpoint, args.port, args.host, args.config) == ("/m", 9000, None, None)
    root = str(tmp_path / "root")
    init_model_root("tiny", root)
    bad_key, bad_limit = tmp_path / "bad_key.yaml", tmp_path / "bad_limit.yaml"
    bad_key.write_text("checkpoint: x\nbogus: 1\n")
    bad_limit.write_text("limits:\n  max_images: 0\n")
    other = str(tmp_path / "other")
    init_model_root("tiny", other)
    meta_path = tmp_path / "other" / "vqgan_lo" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["codebook_size"] = 8192  # a tokenizer of other codes than the base draws: no fit
    meta_path.write_text(json.dumps(meta))
    cut = str(tmp_path / "cut")  # weights cut short, as an interrupted copy leaves them
    init_model_root("tiny", cut)
    weights = tmp_path / "cut" / "superres" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with socket.socket() as held:  # a port some other server holds
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert "in use" in port_taken("127.0.0.1", taken)
        monkeypatch.setattr(jobs.cluster, "cluster_address", lambda: None)  # as on a machine with no Ray
        for argv, why in (([], "give --checkpoint ROOT"),
                          (["--checkpoint", str(tmp_path / "nope")], "lacks text_encoder, vqgan_lo, base"),
                          (["--checkpoint", other], "base expects 8x8 tokens of 512 codes, vqgan_lo gives 8x8 of 8192"),
                          (["--checkpoint", cut], "--checkpoint: superres: "),
                          (["--checkpoint", root, "--config", str(tmp_path / "none.yaml")], "--config: [Errno 2]"),
                          (["--config", str(bad_key)], "bogus: Extra inputs are not permitted"),
                          (["--checkpoint", root, "--config", str(bad_limit)], "limits.max_images:"),
                          (["--checkpoint", root, "--port", "70000"], "--port must be 1-65535"),
                          (["--checkpoint", root, "--port", str(taken)], f"cannot listen on 127.0.0.1:{taken}"),
                          *((["--checkpoint", root, "--config", str(write(tmp_path / f"malformed{i}.yaml", text))], why)
                            for i, (text, why) in enumerate(MALFORMED_SERVE_CONFIGS))):
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and why in err and "Traceback" not in err, (argv, err)
            assert err.count("muse serve: error:") == 1


# Serve configs of the wrong shape: one line each, not a traceback.
MALFORMED_SERVE_CONFIGS = (
    ("applications: foo\n", "applications must be a list of mappings"),
    ("applications: [foo]\n", "applications must be a list of mappings"),
    ("applications:\n  - args: [1, 2]\n", "args must be a mapping"),
    ("applications: []\n", "applications is empty"),
    ("http_options: {host: 5}\napplications: [{args: {}}]\n", "host must be a string and port an integer"),
    ("http_options: {hots: 0.0.0.0}\napplications: [{args: {}}]\n", "reads host and port only, not ['hots']"),
)


def write(path, text: str):
    path.write_text(text)
    return path


def test_cli_takes_host_and_port_from_a_serve_config(tmp_path):
    from serve.cli import parse_args, resolve

    root = str(tmp_path / "root")
    from muse.checkpoint import init_model_root

    init_model_root("tiny", root, components=("text_encoder", "vqgan_lo", "base"))
    config = tmp_path / "serve.yaml"
    config.write_text(f"http_options:\n  host: 0.0.0.0\n  port: 8123\napplications:\n  - args:\n"
                      f"      checkpoint: {root}\n")
    parser, args = parse_args(["--config", str(config)])
    app_args, host, port = resolve(parser, args)
    assert (app_args.checkpoint, host, port) == (root, "0.0.0.0", 8123)
    parser, args = parse_args(["--config", str(config), "--port", "9001", "--host", "127.0.0.1"])
    assert resolve(parser, args)[1:] == ("127.0.0.1", 9001)  # the flags win
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"checkpoint: {root}\n")
    parser, args = parse_args(["--config", str(plain)])
    assert resolve(parser, args)[1:] == ("127.0.0.1", 8000)


def test_serve_config_args_reach_build_app_the_way_serve_passes_them(tmp_path):
    """`serve run serve/config.yaml` hands build_app the YAML's `args` through Serve's own builder call."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from muse.checkpoint import init_model_root
    from serve.app import build_app

    root = str(tmp_path / "root")
    init_model_root("tiny", root)
    args = load_args(REPO / "serve" / "config.yaml")
    app = call_user_app_builder_with_args_if_necessary(build_app, {**args, "checkpoint": root, "api_key": "k"})
    *handles, built = app._bound_deployment.init_args
    assert built.checkpoint == root and built.base.batching.max_rows == 32 and built.api_key == "k"
    assert handles[2] is not None  # super-res present in this root
    # One access-log line per HTTP request (the ingress's), not one more per stage of the chain.
    assert app._bound_deployment.logging_config["enable_access_log"] is True
    assert [h._bound_deployment.logging_config["enable_access_log"] for h in handles] == [False] * 4
    with pytest.raises(ValueError):
        call_user_app_builder_with_args_if_necessary(build_app, {"checkpoint": root, "bogus": 1})


def test_what_the_config_leaves_out_of_sampling_is_the_roots_recorded_sampling(tmp_path):
    """A root trained by the demo's recipe records guidance 1 (ROOT/sampling.json): served with the shipped
    config, which leaves it out, requests draw with it, as `muse generate` does; a config that names a
    setting keeps its own."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from muse.checkpoint import init_model_root
    from muse.root_sampling import RootSampling, write_root_sampling
    from serve.app import build_app

    root = str(tmp_path / "root")
    init_model_root("tiny", root)
    write_root_sampling(root, RootSampling(guidance_scale=1.0, superres_top_k=1))
    args = load_args(REPO / "serve" / "config.yaml")
    for given, guidance in (({}, 1.0), ({"guidance_scale": 2.5}, 2.5)):
        sampling = {**args["sampling"], **given}
        app = call_user_app_builder_with_args_if_necessary(build_app, {**args, "checkpoint": root,
                                                                       "sampling": sampling})
        *handles, built = app._bound_deployment.init_args
        assert (built.sampling.guidance_scale, built.sampling.superres_top_k) == (guidance, 1)
        assert built.sampling.steps == 24 and built.sampling.preview_every == 4  # not recorded: the defaults
        assert handles[2]._bound_deployment.init_kwargs["top_k"] == 1  # super-res draws the likeliest code


def test_a_port_for_a_new_server_is_free_and_outside_the_ranges_other_processes_take_ports_from(monkeypatch):
    """The demo's and the tests' servers listen on `unused_port()`: free now, above Ray's worker ports and
    below the kernel's ephemeral range, so no bind(0) or outgoing connection of Ray's takes it first (a
    port from the ephemeral range once failed the demo's proxy: 'Failed to bind to address')."""
    import random
    import socket

    from serve import app

    start = app._ephemeral_ports_start()
    ports = {app.unused_port() for _ in range(20)}
    assert all(20000 <= p < start for p in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    with socket.socket() as held:  # a drawn port that is taken is passed over
        held.bind(("127.0.0.1", min(ports)))
        draws = iter([[min(ports), max(ports)]])
        monkeypatch.setattr(random.SystemRandom, "sample", lambda self, population, k: next(draws))
        assert app.unused_port() == max(ports)
