"""The model deployments: each wraps one `muse` object loaded from a model root (local or s3://).

    TextEncoder        prompt (+ negative prompt) -> T5 embeddings            muse.text.TextEncoder
    BaseGenerator      embeddings -> low-res token grid (n, h, w)             muse.transformer.MaskedTransformer
    SuperResGenerator  embeddings + low-res grid -> high-res grid             muse.transformer.SuperResTransformer
    Decoder            token grid -> PNG bytes (and image -> tokens for edits)  muse.vqgan.VQGAN (lo and hi)

The ingress chains them by passing one call's DeploymentResponse straight into the next, so token
grids move between model replicas without passing through the ingress.

Batching: BaseGenerator and SuperResGenerator collect requests from different callers with
`@serve.batch` (size and wait from config). A batch is split by step count; each group is one
`sampling.generate` call in which classifier-free guidance stays one batched forward over
[cond ; uncond], guidance is a per-row tensor, and every row draws from its own generator seeded
from its request's seed (row i of a request with seed s: `sampling.image_seed(s, i)`), so a request's image does not
depend on what it was batched with. Each stage returns its rows' generator states beside the ids and
the next stage continues from them, exactly as `MusePipeline` does: the server and the one-process
pipeline give the same image for the same seed. Model work runs in a worker thread so the replica's
event loop keeps accepting requests (and filling the next batch) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np
import torch
from ray import serve

from muse import checkpoint, editing, sampling
from muse.data.images import uint8_to_tensor
from serve.config import MERGED_BATCHES, Batching
from serve.images import Output, fill_masked, grey_out, image_bytes



@dataclass
class TextCond:
    """One request's text conditioning (what TextEncoder returns)."""

    emb: torch.Tensor  # (1, L, D)
    mask: torch.Tensor  # (1, L) bool
    neg_emb: torch.Tensor | None = None  # (1, L', D) negative prompt, replaces the unconditional branch
    neg_mask: torch.Tensor | None = None


@dataclass
class Decode:
    """How to decode one request's images."""

    n: int
    steps: int
    guidance_scale: float
    seed: int


@dataclass
class Tokens:
    """A stage's output: what the next stage and the decoder take."""

    ids: torch.Tensor  # (n, side, side) long
    rng: list[torch.Tensor]  # each row's generator state after this stage; the next stage continues it
    changed: torch.Tensor | None = None  # (n, side, side) bool for edits: decoded anew; None = everything


@dataclass
class _Job:
    cond: TextCond
    decode: Decode
    init_ids: torch.Tensor | None = None  # (N,) ids of the source image (edits)
    regenerate: torch.Tensor | None = None  # (n, N) bool, True = decode anew (per row)
    lo: Tokens | None = None  # super-res only: the low-res stage's output


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit tests)
        return "local"


def _pad_cat(embs: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (1, L_i, D) embeddings and (1, L_i) masks along the batch, zero-padding L."""
    length = max(e.shape[1] for e in embs)
    emb = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e in embs])
    mask = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1]), value=False) for m in masks])
    return emb, mask


class _Cancelled(Exception):
    pass


class TextEncoder:
    """Prompt and negative prompt -> T5 embeddings, once per request (reused at every step)."""

    def __init__(self, checkpoint_root: str, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = checkpoint.load_component(checkpoint.component_uri(checkpoint_root, "text_encoder"),
                                               device=self.device, expect_kind="text_encoder")

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str | None = None) -> TextCond:
        # Encoded one at a time: padding the prompt to the negative's length would change nothing
        # in exact arithmetic but could flip a sampled token in floating point.
        emb, mask = self.model([prompt])  # (1, L, D)
        cond = TextCond(emb.cpu(), mask.cpu())
        if negative_prompt:
            emb, mask = self.model([negative_prompt])
            cond.neg_emb, cond.neg_mask = emb.cpu(), mask.cpu()
        return cond


class _TokenGenerator:
    """What BaseGenerator and SuperResGenerator share: batched, per-row-seeded decoding. Each
    subclass declares its own `@serve.batch` method `_decode_batch` (one queue per deployment)."""

    component = ""

    def __init__(self, checkpoint_root: str, device: str, batching: Batching, choice_temperature: float,
                 preview_every: int, compile_step: bool = False, stuck_after_s: float = 300.0):
        self.device = torch.device(device)
        self.model = checkpoint.load_component(checkpoint.component_uri(checkpoint_root, self.component),
                                               device=self.device, expect_kind=self.component)
        self.side = self.model.config.tokens_per_side if self.component == "base" else \
            self.model.config.hi_tokens_per_side
        if compile_step:
            self.model.compile_step()
        self.choice_temperature = choice_temperature
        self.stuck_after_s = stuck_after_s
        self._decoding = 0  # decodes in flight (batched, streamed or edits)
        self._last_step = time.monotonic()  # when any of them last finished a step
        self.preview_every = preview_every
        self.max_batch_size = batching.max_batch_size
        self.batch_sizes: Counter[int] = Counter()  # requests per model decode
        self.streams: Counter[str] = Counter()  # "completed" / "stopped" (the caller went away)
        self._pending: list[tuple[_Job, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._decode_batch.set_max_batch_size(batching.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def _context(self, emb: torch.Tensor, mask: torch.Tensor, jobs: list[_Job]):
        raise NotImplementedError

    async def _run_batch(self, jobs: list[_Job]) -> list[Tokens]:
        """Decode a batch that @serve.batch formed. Serve forms the next batch from whatever arrived
        within `batch_wait_timeout_s` even while the model is still busy with the previous one, so
        under load it would queue many small batches; instead, batches wait in one queue that a
        single worker drains, each decode taking everything waiting (up to max_batch_size requests).
        A caller that goes away cancels its futures and the worker skips them."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._pending.extend(zip(jobs, futures))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return list(await asyncio.gather(*futures))

    async def _work(self) -> None:
        while self._pending:
            take, self._pending = self._pending[:self.max_batch_size], self._pending[self.max_batch_size:]
            take = [(job, future) for job, future in take if not future.done()]
            if not take:
                continue
            self.batch_sizes[len(take)] += 1
            try:
                results = await asyncio.to_thread(self._decode_jobs, [job for job, _ in take])
            except Exception as e:  # noqa: BLE001 - every request of this decode gets the error
                for _, future in take:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, future), tokens in zip(take, results):
                    if not future.done():
                        future.set_result(tokens)

    def check_health(self) -> None:
        """Serve's health probe: fails when decodes are in flight but none has finished a step for
        `stuck_after_s` (a hung kernel or device), or when the device cannot run a tiny op."""
        idle = time.monotonic() - self._last_step
        if self._decoding and idle > self.stuck_after_s:
            raise RuntimeError(f"{self._decoding} decode(s) in flight and no step finished for {idle:.0f} s")
        torch.ones(1, device=self.device).add_(1).cpu()  # raises on a broken device

    def _progress(self, callback: Callable[[int, torch.Tensor], None] | None):
        """A step callback that records progress for `check_health`, then calls `callback`."""
        def on_step(step: int, ids: torch.Tensor) -> None:
            self._last_step = time.monotonic()
            if callback is not None:
                callback(step, ids)
        return on_step

    @contextlib.contextmanager
    def _in_flight(self):
        if not self._decoding:
            self._last_step = time.monotonic()  # idle time before a decode is not a stall
        self._decoding += 1
        try:
            yield
        finally:
            self._decoding -= 1

    def _decode_jobs(self, jobs: list[_Job]) -> list[Tokens]:
        """Each job's Tokens; jobs with the same step count share one decode."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.decode.steps].append(i)
        out: list[Tokens | None] = [None] * len(jobs)
        for steps, members in groups.items():
            group = [jobs[i] for i in members]
            for i, tokens in zip(members, self._decode_group(group, steps)):
                out[i] = tokens
        return out

    @torch.no_grad()
    def _decode_group(self, jobs: list[_Job], steps: int,
                      callback: Callable[[int, torch.Tensor], None] | None = None) -> list[Tokens]:
        """One sampling.generate over every row of `jobs` -> one Tokens per job."""
        dev = self.device
        rep = lambda t, job: t.to(dev).expand(job.decode.n, *t.shape[1:])  # noqa: E731
        emb, mask = _pad_cat([rep(j.cond.emb, j) for j in jobs], [rep(j.cond.mask, j) for j in jobs])
        context = self._context(emb, mask, jobs)
        scale = torch.tensor([j.decode.guidance_scale for j in jobs for _ in range(j.decode.n)], device=dev)
        uncond = None
        if bool((scale != 0).any()):
            # A negative prompt replaces the unconditional branch; otherwise the text is dropped
            # (an all-False mask leaves only the learned null token).
            neg = [(j.cond.neg_emb, j.cond.neg_mask) if j.cond.neg_emb is not None
                   else (torch.zeros_like(j.cond.emb[:, :1]), torch.zeros_like(j.cond.mask[:, :1])) for j in jobs]
            uemb, umask = _pad_cat([rep(e, j) for (e, _), j in zip(neg, jobs)],
                                   [rep(m, j) for (_, m), j in zip(neg, jobs)])
            uncond = self._context(uemb, umask, jobs)
        gens = [g for j in jobs for g in _generators(j, dev)]
        init_ids = fixed = None
        if any(j.init_ids is not None for j in jobs):
            n_tok, mask_id = self.model.num_tokens, self.model.mask_token_id
            init_ids = torch.cat([
                (j.init_ids if j.init_ids is not None else torch.full((n_tok,), mask_id)).to(dev).expand(j.decode.n, -1)
                for j in jobs])
            fixed = torch.cat([
                (~j.regenerate if j.regenerate is not None else torch.zeros(j.decode.n, n_tok, dtype=torch.bool))
                .to(dev) for j in jobs])
        with self._in_flight():
            ids = sampling.generate(
                self.model, context, uncond, steps=steps, guidance_scale=scale, generator=gens,
                choice_temperature=self.choice_temperature, init_ids=init_ids, fixed=fixed,
                callback=self._progress(callback),
            ).view(-1, self.side, self.side).cpu()
        out, start = [], 0
        for j in jobs:
            rows = slice(start, start + j.decode.n)
            start += j.decode.n
            changed = None if j.regenerate is None else j.regenerate.view(-1, self.side, self.side)
            out.append(Tokens(ids[rows], [g.get_state() for g in gens[rows]], changed))
        return out

    async def _stream(self, job: _Job) -> AsyncIterator[dict]:
        """Yield {"step", "steps", "ids", "done"}: a partial grid (n, side, side) every `preview_every`
        steps ([MASK] where undecided), then the final Tokens with done=True. Stops decoding when the
        caller goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        steps, shape = job.decode.steps, (job.decode.n, self.side, self.side)

        def on_step(step: int, ids: torch.Tensor) -> None:
            if cancelled.is_set():
                raise _Cancelled
            if preview_after(step, steps, self.preview_every):
                loop.call_soon_threadsafe(queue.put_nowait, (step + 1, ids.view(shape).cpu().clone(), None))

        def run() -> None:
            try:
                (tokens,) = self._decode_group([job], steps, on_step)
                loop.call_soon_threadsafe(queue.put_nowait, (steps, tokens, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, (steps, None, e))

        worker = loop.run_in_executor(None, run)
        finished = False
        try:
            while True:
                step, ids, error = await queue.get()
                if error is not None:
                    raise error
                yield {"step": step, "steps": steps, "ids": ids, "done": step == steps}  # ids: Tokens when done
                if step == steps:
                    finished = True
                    break
        finally:
            cancelled.set()
            self.streams["completed" if finished else "stopped"] += 1
            await asyncio.shield(worker)

    def stats(self) -> dict:
        """Requests per decode so far, streams completed or stopped early, and this replica's id."""
        return {"replica": _replica_id(), "batch_sizes": dict(self.batch_sizes), "streams": dict(self.streams)}


class BaseGenerator(_TokenGenerator):
    """Text -> low-res token grid (Muse base model, 24 steps by default)."""

    component = "base"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=MERGED_BATCHES)
    async def _decode_batch(self, jobs: list[_Job]) -> list[Tokens]:  # size and wait set from config in __init__
        return await self._run_batch(jobs)

    def _context(self, emb, mask, jobs):
        return self.model.encode_context(emb, mask)

    async def generate(self, cond: TextCond, decode: Decode, init_ids: torch.Tensor | None = None,
                       regenerate: torch.Tensor | None = None) -> Tokens:
        """Tokens (n, h, w). With init_ids (1, h, w) and regenerate (h, w) bool: inpainting, where
        tokens outside `regenerate` stay fixed."""
        return await self._decode_batch(_Job(cond, decode, _flat(init_ids), _rows(regenerate, decode.n)))

    async def stream(self, cond: TextCond, decode: Decode, init_ids: torch.Tensor | None = None,
                     regenerate: torch.Tensor | None = None) -> AsyncIterator[dict]:
        job = _Job(cond, decode, _flat(init_ids), _rows(regenerate, decode.n))
        async for event in self._stream(job):
            yield event

    async def edit(self, cond: TextCond, decode: Decode, init_ids: torch.Tensor, iterations: int,
                   fraction: float) -> Tokens:
        """Mask-free editing (Muse §3.3): from the image's ids (1, h, w), resample a random `fraction`
        of the tokens `iterations` times under the prompt (top-k 3, constant guidance)."""
        return await asyncio.to_thread(self._edit, _Job(cond, decode, _flat(init_ids)), iterations, fraction)

    @torch.no_grad()
    def _edit(self, job: _Job, iterations: int, fraction: float) -> Tokens:
        n, dev = job.decode.n, self.device
        rows = lambda t: t.to(dev).expand(n, *t.shape[1:])  # noqa: E731
        context = self.model.encode_context(rows(job.cond.emb), rows(job.cond.mask))
        uncond = None
        if job.decode.guidance_scale != 0:
            emb, mask = _negative(job.cond)
            uncond = self.model.encode_context(rows(emb), rows(mask))
        gens = _generators(job, dev)
        source = job.init_ids.view(1, self.side, self.side).expand(n, -1, -1)
        with self._in_flight():
            ids = editing.edit_tokens(
                self.model, context, uncond, source.to(dev), iterations=iterations, fraction=fraction,
                guidance_scale=job.decode.guidance_scale, generator=gens, callback=self._progress(None),
            ).cpu()
        return Tokens(ids, [g.get_state() for g in gens], ids != source)


class SuperResGenerator(_TokenGenerator):
    """Text + low-res grid -> high-res token grid (Muse super-res model, 8 steps by default)."""

    component = "superres"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=MERGED_BATCHES)
    async def _decode_batch(self, jobs: list[_Job]) -> list[Tokens]:  # size and wait set from config in __init__
        return await self._run_batch(jobs)

    def _context(self, emb, mask, jobs):
        lo = torch.cat([j.lo.ids.reshape(j.decode.n, -1) for j in jobs]).to(self.device)
        return self.model.encode_context(emb, mask, lo)

    def _job(self, cond: TextCond, lo: Tokens, decode: Decode, init_ids: torch.Tensor | None) -> _Job:
        """With init_ids (1, H, W) of the source image: high-res tokens are decoded anew where the
        low-res stage changed them (its `changed` mask upsampled) and kept elsewhere."""
        regenerate = None
        if init_ids is not None:
            if lo.changed is None:
                raise ValueError("init_ids needs low-res Tokens from an edit (with `changed`)")
            regenerate = editing.upsample_token_mask(lo.changed, self.side).reshape(decode.n, -1)  # (n, N)
        return _Job(cond, decode, _flat(init_ids), regenerate, lo)

    async def generate(self, cond: TextCond, lo: Tokens, decode: Decode,
                       init_ids: torch.Tensor | None = None) -> Tokens:
        """Tokens (n, H, W) conditioned on the low-res Tokens, continuing each row's generator."""
        return await self._decode_batch(self._job(cond, lo, decode, init_ids))

    async def stream(self, cond: TextCond, lo: Tokens, decode: Decode,
                     init_ids: torch.Tensor | None = None) -> AsyncIterator[dict]:
        async for event in self._stream(self._job(cond, lo, decode, init_ids)):
            yield event


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _rows(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """One (h, w) mask for all n rows -> (n, N)."""
    return None if mask is None else mask.reshape(1, -1).expand(n, -1)


def _negative(cond: TextCond) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional branch: the negative prompt, else the text dropped (an all-False mask
    leaves only the model's learned null token)."""
    if cond.neg_emb is not None:
        return cond.neg_emb, cond.neg_mask
    return torch.zeros_like(cond.emb[:, :1]), torch.zeros_like(cond.mask[:, :1])


def preview_after(step: int, steps: int, every: int) -> bool:
    """Whether a stream sends a preview after decoding step `step` (0-based) of `steps`: every
    `every` steps, never after the last (the final grid follows instead)."""
    return (step + 1) % every == 0 and step + 1 < steps


def _generators(job: _Job, device: torch.device) -> list[torch.Generator]:
    """Row i: seeded from (seed, i), or resumed from the previous stage's state for that row."""
    gens = []
    for i in range(job.decode.n):
        g = torch.Generator(device=device)
        if job.lo is not None:
            g.set_state(job.lo.rng[i])
        else:
            g.manual_seed(sampling.image_seed(job.decode.seed, i))
        gens.append(g)
    return gens


class Decoder:
    """VQGAN token grids -> PNG bytes for the low-res ("lo") and high-res ("hi") stages, and images ->
    token grids for edits."""

    def __init__(self, checkpoint_root: str, device: str = "cpu"):
        self.device = torch.device(device)
        self.vqgans = {"lo": self._load(checkpoint_root, "vqgan_lo")}
        if checkpoint.has_component(checkpoint_root, "vqgan_hi"):
            self.vqgans["hi"] = self._load(checkpoint_root, "vqgan_hi")

    def _load(self, root: str, name: str):
        return checkpoint.load_component(checkpoint.component_uri(root, name), device=self.device, expect_kind="vqgan")

    @torch.no_grad()
    def decode(self, tokens: Tokens, stage: str, out: Output = Output()) -> list[bytes]:
        """Tokens (n, h, w) -> n encoded images (PNG at the stage's resolution by default)."""
        images = self.vqgans[stage].decode(tokens.ids.to(self.device)).cpu()
        return [image_bytes(img, out) for img in images]

    @torch.no_grad()
    def preview(self, ids: torch.Tensor, stage: str, out: Output = Output()) -> list[bytes]:
        """A partially decoded grid (n, h, w) with [MASK] ids -> n images, undecided patches grey."""
        vqgan = self.vqgans[stage]
        filled, masked = fill_masked(ids, vqgan.config.codebook_size)
        images = grey_out(vqgan.decode(filled.to(self.device)).cpu(), masked)
        return [image_bytes(img, out) for img in images]

    @torch.no_grad()
    def encode(self, image: np.ndarray, stage: str) -> torch.Tensor:
        """(side, side, 3) uint8 at the stage's resolution -> ids (1, h, w)."""
        x = uint8_to_tensor(image[None]).to(self.device)  # (1, 3, H, W)
        return self.vqgans[stage].encode(x).cpu()
