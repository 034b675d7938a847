"""aMUSEd-256 at its released size (random weights): our imported modules against diffusers'.

    python benchmarks/amused_parity.py

The tests compare the two at shrunk widths; this checks the released widths once: U-ViT logits
(603.5M), VQ decode and encode ids (146M), then the CPU seconds of one guided forward (2 rows: the
prompt and the empty prompt) of each transformer, our forward computing logits only at the masked
positions (half of them here), as our sampler asks. CPU seconds (process time), so a shared machine
skews the ratio less than wall time would. Needs diffusers (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import amused_peer as peer  # noqa: E402

from muse import sampling  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.set_num_threads(1)
    pipe = peer.amused("equal", "cpu", torch.float32)
    uvit, vq = peer.imported(pipe, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (1, 256), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.5] = uvit.mask_token_id
    pooled, hidden = torch.randn(1, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    micro = torch.tensor([[256.0, 256, 0, 0, 6]])
    with torch.inference_mode():
        ref = pipe.transformer(ids.view(1, 16, 16), micro_conds=micro, pooled_text_emb=pooled,
                               encoder_hidden_states=hidden).permute(0, 2, 3, 1).reshape(1, 256, -1)
        ctx = uvit.encode_context(torch.cat([pooled[:, None], hidden], 1), torch.ones(1, 78, dtype=torch.bool))
        ours = uvit(ids, ctx)
        print(f"U-ViT logits: max |diff| {(ours - ref).abs().max():.2e} (max |logit| {ref.abs().max():.2f})")
        codes = torch.randint(0, 8192, (1, 16, 16), generator=g)
        a = pipe.vqvae.decode(codes.flatten(), force_not_quantize=True, shape=(1, 16, 16, 64)).sample
        print(f"VQ decode: max |diff| {(a - vq.decode_codes(codes)).abs().max():.2e}")
        x = torch.rand(1, 3, 256, 256, generator=g)
        theirs = pipe.vqvae.quantize(pipe.vqvae.encode(x).latents)[2][2].view(1, 16, 16)
        print(f"VQ encode ids identical: {torch.equal(theirs, vq.quantize(vq.encode_latents(x)))}")

        both = torch.cat([ids, ids])
        joint = sampling.cfg_context(ctx, uvit.null_context())
        select = both == uvit.mask_token_id
        inputs = dict(micro_conds=micro.expand(2, -1), pooled_text_emb=pooled.expand(2, -1),
                      encoder_hidden_states=hidden.expand(2, -1, -1))
        for _ in range(2):
            start = time.process_time()
            pipe.transformer(both.view(2, 16, 16), **inputs)
            mid = time.process_time()
            uvit(both, joint, select=select)
            end = time.process_time()
            print(f"one guided forward, CPU s: diffusers {mid - start:.2f}, ours {end - mid:.2f}, "
                  f"diffusers/ours {(mid - start) / (end - mid):.2f}x", flush=True)


if __name__ == "__main__":
    main()
