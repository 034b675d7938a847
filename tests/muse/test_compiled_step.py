"""The compiled sampling step (`StepCompiler.compile_step`): the mode follows the device it decodes on,
a failing compiler falls back to the eager step, and a decode compiles one graph per shape."""

import warnings

import pytest
import torch

from muse.config import preset
from muse.transformer import MaskedTransformer
from test_transformer import _text


def test_a_failing_compiled_step_falls_back_to_the_eager_one(monkeypatch):
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny")).eval()
    emb, mask = _text()
    ctx = model.encode_context(emb, mask)
    ids = torch.randint(0, 513, (2, 64))
    with torch.no_grad():
        eager = model(ids, ctx)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    model.compile_step()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="running eagerly"):
        fallback = model(ids, ctx)
    torch.testing.assert_close(fallback, eager)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ctx), eager)  # warned once, eager from then on

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: out_of_memory)
    model.compile_step()
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):  # the request's failure, not the compiler's
        model(ids, ctx)
    assert model._compiled is out_of_memory  # kept for the next request


def test_the_compiled_step_takes_its_mode_from_the_device_it_decodes_on(monkeypatch):
    """`compile()` then `.to("cuda")` (the usual order) must still get CUDA graphs: the mode is chosen at
    the first decode on each device, not from where the weights were when compile was asked for."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: modes.append(mode) or fn)
    model = MaskedTransformer(preset("base-tiny")).eval().compile_step()
    assert modes == []  # nothing compiled before a decode
    assert model._compiled_step(torch.device("cuda")) is not None and modes == ["reduce-overhead"]
    model._compiled_step(torch.device("cuda"))
    assert modes == ["reduce-overhead"]  # once per device
    emb, mask = _text()
    with torch.no_grad():
        model(torch.randint(0, 513, (2, 64)), model.encode_context(emb, mask))
    assert modes == ["reduce-overhead", "default"]  # back on the CPU: inductor's default
    model.compile_step("max-autotune")._compiled_step(torch.device("cuda"))
    assert modes[-1] == "max-autotune"  # an explicit mode is kept on every device


def test_the_compiled_step_is_one_graph_and_compiles_once_more_for_other_prompt_lengths(monkeypatch):
    """A decode through both stages with `MusePipeline.compile()`: every block in one graph (a lazily
    cached field read under a lock split the step into one graph per block, and guards on the block
    index hit torch's recompile limit after 8), and prompts of other lengths reuse one recompiled
    graph instead of compiling again each (8 lengths, then eager for good). Dynamo's eager backend:
    the graphs, breaks and recompiles are dynamo's, and inductor would only take minutes here."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from muse.pipeline import MusePipeline

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: real(fn, backend="eager",
                                                                                    dynamic=dynamic))
    torch._dynamo.reset()
    counters.clear()
    pipe = MusePipeline.from_preset("tiny", seed=0).compile()
    prompts = ["a red circle", "a blue square on grey", "a green triangle beside a small yellow star",
               "red", "a big orange circle above a blue square", "a tiny grey star in the corner of the frame"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to the eager step
            for prompt in prompts[:3]:
                pipe(prompt, steps=2, superres_steps=2, seed=0, output="tokens")
            warm = counters["stats"]["unique_graphs"]
            for prompt in prompts[3:]:
                pipe(prompt, steps=2, superres_steps=2, seed=0, output="tokens")
        assert not counters["graph_break"], dict(counters["graph_break"])
        # Both stages share one code object, whose cache holds 8 graphs: sizes that changed once are
        # free from then on, so other prompt lengths compile nothing more.
        assert counters["stats"]["unique_graphs"] == warm <= 8, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
