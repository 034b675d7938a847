"""The model deployments: each wraps one `muse` object loaded from a model root (local or s3://).

    TextEncoder        prompt (+ negative prompt) -> T5 embeddings            muse.text.TextEncoder
    BaseGenerator      embeddings -> low-res token grid (n, h, w)             muse.transformer.MaskedTransformer
    SuperResGenerator  embeddings + low-res grid -> high-res grid             muse.transformer.SuperResTransformer
    Decoder            token grid -> PNG bytes (and image -> tokens for edits)  muse.vqgan.VQGAN (lo and hi)

The ingress chains them by passing one call's DeploymentResponse straight into the next, so token
grids move between model replicas without passing through the ingress.

Batching: BaseGenerator and SuperResGenerator hand every request (plain, streamed, inpaint,
outpaint, mask-free edit) to one step scheduler per replica (serve/scheduler.py), which decodes
them in shared forwards of at most `batching.max_rows` rows, admits new requests and drops
cancelled ones at every step boundary. Classifier-free guidance stays one batched forward over
[cond ; uncond], and every row draws from its own generator seeded from its request's seed (row i of
a request with seed s: `sampling.image_seed(s, i)`), so a request's image does not depend on what it
was batched with. Each stage returns its rows' generator states beside the ids and the next stage
continues from them, exactly as `MusePipeline` does: the server and the one-process pipeline give
the same image for the same seed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np
import ray
import torch
from ray import serve

from muse import checkpoint, editing, sampling
from muse.data.images import uint8_to_tensor
from muse.token_stages import TextCondition, stage_contexts
from serve.config import Batching, cpu_threads
from serve.pixels import fill_masked, grey_out, image_bytes
from serve.scheduler import DecodeTask, EditTask, Scheduler
from serve.specs import Decode, Output


@dataclass
class TextCond:
    """One request's text conditioning (what TextEncoder returns)."""

    emb: torch.Tensor  # (1, L, D)
    mask: torch.Tensor  # (1, L) bool
    neg_emb: torch.Tensor | None = None  # (1, L', D) negative prompt, replaces the unconditional branch
    neg_mask: torch.Tensor | None = None


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


def _claimed_cpus() -> float | None:
    """The CPUs Ray reserved for this replica (its ray_actor_options, whether from AppArgs or a Serve
    config's override); None outside a Ray worker (unit tests: one thread)."""
    if not ray.is_initialized():  # get_runtime_context() would start a local Ray
        return None
    try:
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a worker (a driver)
        return None


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit tests)
        return "local"


class TextEncoder:
    """Prompt and negative prompt -> T5 embeddings, once per request (reused at every step)."""

    def __init__(self, checkpoint_root: str, device: str = "cpu"):
        torch.set_num_threads(cpu_threads(_claimed_cpus()))  # the CPUs this replica claims
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
    """What BaseGenerator and SuperResGenerator share: every request becomes a task of this
    replica's one `Scheduler` (serve/scheduler.py), which decodes all of them in shared steps."""

    component = ""

    def __init__(self, checkpoint_root: str, device: str, batching: Batching, choice_temperature: float,
                 preview_every: int, compile_step: bool = False, stuck_after_s: float = 300.0,
                 top_k: int | None = None):
        torch.set_num_threads(cpu_threads(_claimed_cpus()))  # the CPUs this replica claims
        self.device = torch.device(device)
        self.model = checkpoint.load_component(checkpoint.component_uri(checkpoint_root, self.component),
                                               device=self.device, expect_kind=self.component)
        self.side = self.model.config.tokens_per_side if self.component == "base" else \
            self.model.config.hi_tokens_per_side
        if compile_step:
            self.model.compile_step()
        self.choice_temperature, self.top_k = choice_temperature, top_k  # top_k: codes drawn among the k likeliest
        self.stuck_after_s = stuck_after_s
        self.preview_every = preview_every
        self.scheduler = Scheduler(self.model, batching.max_rows, batching.batch_wait_timeout_s)
        self.streams: Counter[str] = Counter()  # "completed" / "stopped" (the caller went away)

    def _contexts(self, job: _Job):
        """(context, uncond) of one job, as the one-process pipeline builds them."""
        raise NotImplementedError

    def check_health(self) -> None:
        """Serve's health probe: fails when tasks are in flight but no step finished for
        `stuck_after_s` (a hung kernel or device), or when the device cannot run a tiny op."""
        idle = time.monotonic() - self.scheduler.last_progress
        if self.scheduler.active and idle > self.stuck_after_s:
            raise RuntimeError(f"{len(self.scheduler.active)} task(s) in flight and no step finished for {idle:.0f} s")
        torch.ones(1, device=self.device).add_(1).cpu()  # raises on a broken device

    def _decode_task(self, job: _Job, preview_every: int = 0) -> DecodeTask:
        task = DecodeTask(job.decode.n, job.decode.guidance_scale != 0, lambda: self._setup(task, job), preview_every)
        return task

    def _setup(self, task: DecodeTask, job: _Job) -> None:
        """In the scheduler's thread: the job's contexts, generators and starting grid."""
        n, dev = job.decode.n, self.device
        task.context, task.uncond = self._contexts(job)
        gens = _generators(job, dev)
        init_ids = fixed = None
        if job.init_ids is not None:
            init_ids = job.init_ids.to(dev).expand(n, -1)
            fixed = ~job.regenerate.to(dev) if job.regenerate is not None else \
                torch.zeros(n, self.model.num_tokens, dtype=torch.bool, device=dev)
        changed = None if job.regenerate is None else job.regenerate.reshape(n, self.side, self.side)
        task.setup(self.model, job.decode.steps, torch.full((n,), float(job.decode.guidance_scale), device=dev),
                   gens, self.choice_temperature, init_ids, fixed,
                   finish=lambda ids: Tokens(ids.view(n, self.side, self.side).cpu(),
                                             [g.get_state() for g in gens], changed), top_k=self.top_k)

    async def _stream(self, job: _Job) -> AsyncIterator[dict]:
        """Yield {"kind": "admitted"} once the scheduler takes the job, {"kind": "preview", "step",
        "steps", "ids"} every `preview_every` steps (a partial grid (n, side, side), [MASK] where
        undecided), then {"kind": "done", "ids": Tokens}. Stops decoding when the caller goes away."""
        finished = False
        shape = (job.decode.n, self.side, self.side)
        try:
            async for kind, *payload in self.scheduler.events(self._decode_task(job, self.preview_every)):
                if kind == "preview":
                    step, steps, ids = payload
                    yield {"kind": kind, "step": step, "steps": steps, "ids": ids.view(shape).cpu()}
                else:
                    finished = kind == "done"
                    yield {"kind": kind, **({"ids": payload[0]} if finished else {})}
        finally:
            self.streams["completed" if finished else "stopped"] += 1

    def stats(self) -> dict:
        """The scheduler's counters (tasks and budget rows per forward, outcomes, rows in flight),
        streams completed or stopped early, and this replica's id."""
        st = self.scheduler.stats
        return {"replica": _replica_id(), "batch_sizes": dict(st.tasks_per_forward),
                "rows_per_forward": dict(st.rows_per_forward), "outcomes": dict(st.outcomes),
                "in_flight_rows": self.scheduler.in_flight_rows, "waiting": len(self.scheduler.waiting),
                "streams": dict(self.streams)}


class BaseGenerator(_TokenGenerator):
    """Text -> low-res token grid (Muse base model, 24 steps by default)."""

    component = "base"

    def _contexts(self, job):
        return stage_contexts(self.model, *_conditions(job.cond, self.device), guided=job.decode.guidance_scale != 0,
                              repeat=job.decode.n)

    async def generate(self, cond: TextCond, decode: Decode, init_ids: torch.Tensor | None = None,
                       regenerate: torch.Tensor | None = None) -> Tokens:
        """Tokens (n, h, w). With init_ids (1, h, w) and regenerate (h, w) bool: inpainting, where
        tokens outside `regenerate` stay fixed."""
        job = _Job(cond, decode, _flat(init_ids), _rows(regenerate, decode.n))
        return await self.scheduler.run(self._decode_task(job))

    async def stream(self, cond: TextCond, decode: Decode, init_ids: torch.Tensor | None = None,
                     regenerate: torch.Tensor | None = None) -> AsyncIterator[dict]:
        job = _Job(cond, decode, _flat(init_ids), _rows(regenerate, decode.n))
        async for event in self._stream(job):
            yield event

    async def edit(self, cond: TextCond, decode: Decode, init_ids: torch.Tensor, iterations: int,
                   fraction: float) -> Tokens:
        """Mask-free editing (Muse §3.3): from the image's ids (1, h, w), resample a random `fraction`
        of the tokens `iterations` times under the prompt (top-k 3, constant guidance). A scheduler
        task like any other: batched with the rest, and cancelled with its caller."""
        job = _Job(cond, decode, _flat(init_ids))
        n, dev = decode.n, self.device

        def setup() -> None:
            task.context, task.uncond = self._contexts(job)
            gens = _generators(job, dev)
            source = job.init_ids.to(dev).view(1, -1).expand(n, -1)
            task.setup(self.model, source, iterations, fraction,
                       torch.full((n,), float(decode.guidance_scale), device=dev), gens,
                       finish=lambda ids: Tokens(ids.view(n, self.side, self.side).cpu(), [g.get_state() for g in gens],
                                                 (ids != source).view(n, self.side, self.side).cpu()))

        task = EditTask(n, decode.guidance_scale != 0, setup)
        return await self.scheduler.run(task)


class SuperResGenerator(_TokenGenerator):
    """Text + low-res grid -> high-res token grid (Muse super-res model, 8 steps by default)."""

    component = "superres"

    def _contexts(self, job):
        lo = job.lo.ids.reshape(job.decode.n, -1).to(self.device)
        return stage_contexts(self.model, *_conditions(job.cond, self.device), guided=job.decode.guidance_scale != 0,
                              lo_ids=lo)

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
        return await self.scheduler.run(self._decode_task(self._job(cond, lo, decode, init_ids)))

    async def stream(self, cond: TextCond, lo: Tokens, decode: Decode,
                     init_ids: torch.Tensor | None = None) -> AsyncIterator[dict]:
        async for event in self._stream(self._job(cond, lo, decode, init_ids)):
            yield event


def _conditions(cond: TextCond, device: torch.device) -> tuple[TextCondition, TextCondition | None]:
    """The request's prompt and negative prompt as the pipeline's TextConditions."""
    negative = None if cond.neg_emb is None else TextCondition(cond.neg_emb.to(device), cond.neg_mask.to(device))
    return TextCondition(cond.emb.to(device), cond.mask.to(device)), negative


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _rows(mask: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor | None:
    """One (h, w) mask for all n rows (a numpy array from the ingress) -> (n, N). An array that came
    through the object store is read-only, which torch would share and warn about: copied (h * w bools)."""
    if isinstance(mask, np.ndarray) and not mask.flags.writeable:
        mask = mask.copy()
    return None if mask is None else torch.as_tensor(mask).reshape(1, -1).expand(n, -1)


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
        torch.set_num_threads(cpu_threads(_claimed_cpus()))  # the CPUs this replica claims
        self.device = torch.device(device)
        self.vqgans = {"lo": self._load(checkpoint_root, "vqgan_lo")}
        if checkpoint.has_component(checkpoint_root, "vqgan_hi"):
            self.vqgans["hi"] = self._load(checkpoint_root, "vqgan_hi")

    def _load(self, root: str, name: str):
        return checkpoint.load_component(checkpoint.component_uri(root, name), device=self.device, expect_kind="vqgan")

    @torch.no_grad()
    def decode(self, tokens: Tokens, stage: str, out: Output = Output(),
               kept: tuple[np.ndarray, np.ndarray] | None = None) -> list[bytes]:
        """Tokens (n, h, w) -> n encoded images (PNG at the stage's resolution by default). `kept`, an
        edit's (image (side, side, 3) uint8, pixel mask (side, side) bool): its pixels back outside the mask."""
        images = self.vqgans[stage].decode(tokens.ids.to(self.device)).cpu()
        if kept is not None:
            image, mask = kept
            images = editing.keep_pixels(images, uint8_to_tensor(image[None]), torch.as_tensor(np.array(mask)))
        return [image_bytes(img, out) for img in images]

    @torch.no_grad()
    def preview(self, ids: torch.Tensor, stage: str, out: Output = Output()) -> list[bytes]:
        """A partially decoded grid (n, h, w) with [MASK] ids (any id past the codebook) -> n images,
        undecided patches grey."""
        vqgan = self.vqgans[stage]
        filled, masked = fill_masked(ids, vqgan.config.codebook_size)
        images = grey_out(vqgan.decode(filled.to(self.device)).cpu(), masked)
        return [image_bytes(img, out) for img in images]

    @torch.no_grad()
    def encode(self, image: np.ndarray, stage: str) -> torch.Tensor:
        """(side, side, 3) uint8 at the stage's resolution -> ids (1, h, w)."""
        x = uint8_to_tensor(image[None]).to(self.device)  # (1, 3, H, W)
        return self.vqgans[stage].encode(x).cpu()
