"""`muse generate | inpaint | outpaint | edit` (muse/generate_cli.py): the PNGs they write, their checks
and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from muse import generate_cli
from muse.data.images import to_uint8_array


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far too small for intra-op threads to pay (see test_pipeline.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))


def test_cli_generate_and_inpaint_write_pngs(tmp_path, photo, capsys):
    out = tmp_path / "gen"
    rc = generate_cli.main(["generate", "--prompt", "a red circle", "--preset", "tiny", "--n", "2",
                            "--steps", "2", "--superres-steps", "1", "--seed", "3", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["generate_00-01.png", "generate_00.png", "generate_01.png"]
    assert Image.open(out / "generate_00.png").size == (128, 128)
    assert Image.open(out / "generate_00-01.png").size == (256, 128)
    assert str(out / "generate_00.png") in capsys.readouterr().out
    first = (out / "generate_00.png").read_bytes()
    rc = generate_cli.main(["generate", "--prompt", "a blue square", "--preset", "tiny", "--n", "2",
                            "--steps", "2", "--superres-steps", "1", "--seed", "4", "--out", str(out)])
    assert rc == 0 and (out / "generate_00.png").read_bytes() == first  # a second run numbers on
    assert {"generate_02.png", "generate_03.png", "generate_02-03.png"} <= {p.name for p in out.iterdir()}

    photo.save(tmp_path / "in.png")
    mask = np.zeros((96, 96), np.uint8)
    mask[:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rc = generate_cli.main(["inpaint", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                            "--prompt", "a red circle", "--preset", "tiny", "--steps", "2", "--no-superres",
                            "--out", str(tmp_path / "inp")])
    assert rc == 0 and Image.open(tmp_path / "inp" / "inpaint_00.png").size == (64, 64)
    rc = generate_cli.main(["inpaint", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                            "--prompt", "a red circle", "--preset", "tiny", "--steps", "2", "--no-superres",
                            "--keep-pixels", "--out", str(tmp_path / "kept")])
    kept = np.asarray(Image.open(tmp_path / "kept" / "inpaint_00.png"), np.int16)
    src = to_uint8_array(photo, 64).astype(np.int16)  # the input as the model sees it
    plain = np.asarray(Image.open(tmp_path / "inp" / "inpaint_00.png"), np.int16)
    # Below the mask's top half (and its 1-pixel blend band) the input itself comes back.
    assert rc == 0 and np.abs(kept[34:] - src[34:]).max() <= 1 < np.abs(plain[34:] - src[34:]).max()


def test_a_full_disk_names_the_png_it_could_not_write(small_disk, capsys):
    rc = generate_cli.main(["generate", "--prompt", "a red circle", "--preset", "tiny", "--n", "8", "--steps", "1",
                            "--superres-steps", "1", "--out", str(small_disk / "gen")])
    err = capsys.readouterr().err
    assert rc == 1 and f"No space left on device writing {small_disk / 'gen'}/generate_" in err, err


def test_cli_bad_input_exits_2_with_a_message_and_help_exits_0(tmp_path, capsys):
    rc = generate_cli.main(["edit", "--image", str(tmp_path / "missing.png"), "--prompt", "x",
                            "--preset", "tiny", "--out", str(tmp_path / "o")])
    assert rc == 2 and "image" in capsys.readouterr().err
    for argv, said in ((["--device", "meta"], "--device meta holds shapes"), (["--guidance", "nan"], "finite"),
                       (["--batch-size", "0"], "--batch-size must be >= 1"),
                       (["--no-superres", "--superres-top-k", "1"], "--no-superres skips it: drop them"),
                       (["--no-superres", "--superres-steps", "4"], "--no-superres skips it: drop them"),
                       (["--n", "0"], "--n must be >= 1"),  # the flag's name, not the library's
                       (["--superres-top-k", "0"], "--superres-top-k must be an integer >= 1 (or left out)")):
        rc = generate_cli.main(["generate", "--prompt", "x", "--preset", "tiny", "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and "Traceback" not in err, err
    # An empty negative prompt is none, as on the HTTP API.
    assert generate_cli.main(["generate", "--prompt", "x", "--preset", "tiny", "--out", str(tmp_path / "o"),
                              "--negative-prompt", "", "--steps", "1", "--no-superres"]) == 0
    capsys.readouterr()
    for command in generate_cli.COMMANDS:
        with pytest.raises(SystemExit) as exc:
            generate_cli.main([command, "--help"])
        assert exc.value.code == 0
        assert f"muse {command}" in capsys.readouterr().out


def test_cli_checks_its_inputs_before_the_model_loads_and_writes_as_it_draws(tmp_path, capsys, monkeypatch):
    """A typo costs no model load (a missing root would be named otherwise); images are written batch
    by batch, the grid holding the first GRID_MAX; --top-k 0 is the whole codebook; a negative prompt
    at guidance 0 is said to do nothing."""
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small_mask.png")
    missing = ["--checkpoint", str(tmp_path / "no-root"), "--out", str(tmp_path / "o")]
    image = ["--image", str(tmp_path / "in.png")]
    for argv, said in ((["generate", "--prompt", " "], "--prompt is empty"),
                       (["generate", "--prompt", "x", "--seed", "-1"], "--seed must be >= 0, got -1"),
                       (["outpaint", *image, "--prompt", "x", "--scale", "2"], "--scale must be in (0, 1)"),
                       (["edit", "--image", str(tmp_path / "nope.png"), "--prompt", "x"], "--image: no file at"),
                       (["edit", *image, "--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0"),
                       (["inpaint", *image, "--mask", str(tmp_path / "small_mask.png"), "--prompt", "x"],
                        "mask must have the image's size, 32x32")):
        rc = generate_cli.main([*argv, *missing])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and "no-root" not in err, err

    monkeypatch.setattr(generate_cli, "GRID_MAX", 2)
    drawn = []
    real = generate_cli.ImageWriter.add
    monkeypatch.setattr(generate_cli.ImageWriter, "add", lambda self, images: (drawn.append(len(images)),
                                                                               real(self, images)))
    out = tmp_path / "batches"
    rc = generate_cli.main(["edit", *image, "--prompt", "x", "--preset", "tiny", "--n", "3", "--batch-size", "2",
                            "--iterations", "1", "--top-k", "0", "--no-superres", "--guidance", "0",
                            "--negative-prompt", "blue", "--out", str(out)])
    assert rc == 0 and drawn == [2, 1]
    assert "--negative-prompt has no effect with --guidance 0" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["edit_00-01.png", "edit_00.png", "edit_01.png", "edit_02.png"]
    assert Image.open(out / "edit_00-01.png").size == (128, 64)


def test_a_roots_recorded_sampling_is_what_the_flags_leave_out(tmp_path):
    """A root records the sampling its recipe measured (the demo's: guidance 1, where the default 4 fills
    the tiny model's canvas with shapes): `muse generate` without flags draws the same images as with
    those settings given, and a flag still wins over the record."""
    from muse.checkpoint import init_model_root
    from muse.root_sampling import RootSampling, write_root_sampling

    root = str(tmp_path / "root")
    init_model_root("tiny", root)
    write_root_sampling(root, RootSampling(steps=3, superres_steps=2, guidance_scale=1.0, superres_top_k=1))

    def drawn(name: str, *flags: str) -> bytes:
        out = tmp_path / name
        assert generate_cli.main(["generate", "--prompt", "two red circles", "--checkpoint", root, "--seed", "5",
                                  "--out", str(out), *flags]) == 0
        return (out / "generate_00.png").read_bytes()

    recorded = drawn("recorded")
    given = ("--steps", "3", "--superres-steps", "2", "--superres-top-k", "1")
    assert recorded == drawn("given", *given, "--guidance", "1")
    assert recorded != drawn("guidance_4", *given, "--guidance", "4")
