"""Exporting over an existing component is atomic on a local root: a process killed (SIGKILL) half-way
through writing the new component leaves the old one loadable, as the decoder fine-tune needs when it
replaces ROOT/vqgan_hi with a wider decoder."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import torch

from muse import checkpoint
from muse.config import preset
from muse.vqgan import VQGAN


class KilledMidExport(VQGAN):
    """A VQGAN whose process is killed after its new weights are written and before its config is."""

    def save_extra(self, directory: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_export_leaves_the_old_component_and_the_next_export_replaces_it(tmp_path):
    root = str(tmp_path / "root")
    torch.manual_seed(0)
    cfg = preset("vqgan-hi-tiny")
    old = VQGAN(cfg)
    uri = checkpoint.component_uri(root, "vqgan_hi")
    checkpoint.save_component(old, uri)
    wide = replace(cfg, decoder_base_channels=2 * cfg.base_channels)  # as the decoder stage widens it

    pid = os.fork()  # the export runs in a process of its own, which is killed mid-write
    if pid == 0:
        try:
            checkpoint.save_component(KilledMidExport(wide), uri, extra={"decoder_finetuned": True})
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    leftovers = [n for n in os.listdir(root) if n.startswith(".vqgan_hi.staging-")]
    assert leftovers and os.path.exists(os.path.join(root, leftovers[0], checkpoint.WEIGHTS_FILE))  # it died mid-write
    loaded = checkpoint.load_component(uri)
    assert loaded.config == cfg and "extra" not in checkpoint.read_meta(uri)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))

    checkpoint.save_component(VQGAN(wide), uri, extra={"decoder_finetuned": True})
    assert checkpoint.load_component(uri).config == wide
    assert os.listdir(root) == ["vqgan_hi"]  # the killed export's files are gone, and the old component


def test_exporting_over_a_linked_component_writes_it_into_the_root_and_leaves_the_link_target(tmp_path):
    """A root whose component is a symlink to a shared one: the new component lands in the root, the
    shared one stays as it was (other roots read it), and no hidden link is left behind."""
    torch.manual_seed(0)
    cfg = preset("vqgan-hi-tiny")
    shared = str(tmp_path / "shared" / "vqgan_hi")
    checkpoint.save_component(VQGAN(cfg), shared)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(shared, root / "vqgan_hi")
    wide = replace(cfg, decoder_base_channels=2 * cfg.base_channels)
    uri = checkpoint.component_uri(str(root), "vqgan_hi")
    checkpoint.save_component(VQGAN(wide), uri)
    assert not os.path.islink(uri) and checkpoint.load_component(uri).config == wide
    assert checkpoint.load_component(shared).config == cfg
    assert os.listdir(root) == ["vqgan_hi"]
