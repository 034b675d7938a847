"""One step scheduler per generator replica: every kind of work (text to image, streams, inpainting,
outpainting, mask-free edits) decodes in one shared batch that is re-formed at every step.

    waiting ──admit (row budget)──▶ active ──one forward over every active row──▶ each task's update
                                      ▲                                               │
                                      └──── done / failed / cancelled leave here ◀────┘

Why not `@serve.batch`: in Ray Serve 2.60 a batch is fixed when its handler starts. Requests that
arrive while it decodes cannot join it (they wait for the whole decode, or start a second decode that
competes for the device), and a member whose caller is cancelled keeps its rows until the batch ends.
Here a batch is one decoding step: new requests join at the next step boundary, a cancelled one
(client gone, timeout) leaves there and frees its rows, and tasks at different steps share a forward.

Row budget: a task takes `n` rows, or `2n` when it uses classifier-free guidance (the conditional and
unconditional branches run as one batched forward, so they cost two rows each); a forward holds just
those rows (an unguided task adds no unconditional rows). Tasks are admitted in
arrival order while their rows fit in `max_rows`; a task larger than the budget runs when it is alone.

Same images batched or not: each task holds its own ids, its rows' uniforms (drawn up front from its
per-image generators, as `muse.sampling.generate` does), its schedule and its guidance ramp; only
the transformer's forward is shared, and cross-attention runs per task (`ContextStack`). A task's
update is `sampling.generate`'s (or `editing.edit_tokens`') loop body, one step at a time.

Failure isolation: if a shared forward raises (a poison input, out of memory), each task of that step
is run alone, so only the ones that fail by themselves fail. Errors in one task's preparation or
update fail that task only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from muse import sampling
from muse.context import Context, ContextStack
from serve.specs import preview_after


@dataclass
class Step:
    """What a task feeds one forward."""

    ids: torch.Tensor  # (b, N) long, the model's input
    select: torch.Tensor  # (b, N) bool, positions whose logits the task needs
    weight: torch.Tensor  # (b,) guidance t of this step (0: the conditional logits alone)
    guided: bool  # this step needs the unconditional branch


class Task:
    """One request's decode. `prepare` (model work, in the worker thread) builds `context`,
    `uncond` and the state; then `inputs()` and `advance(logits)` alternate until `done`."""

    def __init__(self, rows: int, guided: bool, prepare: Callable[[], None], preview_every: int = 0):
        self.rows, self.guided = rows, guided
        self.cost = rows * (2 if guided else 1)  # rows of the budget
        self.prepare = prepare
        self.preview_every = preview_every  # 0: no previews (a plain request)
        self.context: Context | None = None
        self.uncond: Context | None = None
        self.done = self.cancelled = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.events: asyncio.Queue | None = None  # set by the scheduler
        self.outbox: list[tuple] = []  # filled in the worker thread, delivered on the event loop

    def inputs(self) -> Step:
        raise NotImplementedError

    def advance(self, logits: torch.Tensor) -> None:
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True


class DecodeTask(Task):
    """Iterative parallel decoding of `rows` rows (muse.sampling.generate, one step per call):
    text to image, and inpainting / outpainting with `init_ids` and `fixed`."""

    def setup(self, model, steps: int, scale: torch.Tensor, generators: list[torch.Generator],
              choice_temperature: float, init_ids: torch.Tensor | None = None,
              fixed: torch.Tensor | None = None, finish: Callable[[torch.Tensor], Any] | None = None,
              top_k: int | None = None) -> None:
        B, N, mask_id, dev = self.rows, model.num_tokens, model.mask_token_id, scale.device
        self.mask_id = mask_id
        self.scale, self.choice_temperature, self.finish, self.top_k = scale, choice_temperature, finish, top_k
        self.ids = sampling.initial_ids(B, N, mask_id, dev, init_ids, fixed)
        self.draws = sampling.decode_uniforms(generators, B, steps, N, dev)  # as generate draws them
        guided_rows = (scale != 0).tolist() if self.guided else [False] * B
        self.plan = sampling.decode_plan((self.ids == mask_id).sum(dim=1).tolist(), steps, choice_temperature,
                                         guided_rows, "cosine", dev)
        self.steps, self.step = self.plan.steps, 0
        if self.steps == 0:  # nothing to decode (an edit that changed no token): the ids, as generate returns them
            self.result, self.done = self.finish(self.ids), True

    def inputs(self) -> Step:
        self.masked = self.ids == self.mask_id  # (B, N)
        return Step(self.ids, self.masked, self.scale * self.plan.ramps[self.step], self.plan.guided[self.step])

    def advance(self, logits: torch.Tensor) -> None:
        step, masked = self.step, self.masked
        picked, logp = sampling.sample_tokens(logits, self.draws[:, step, 0][masked], top_k=self.top_k)
        self.ids = sampling.remask(self.ids, masked, picked, logp, self.draws[:, step, 1][masked], self.plan, step,
                                   self.mask_id)
        self.step += 1
        if self.step == self.steps or not bool((self.ids == self.mask_id).any()):
            self.result, self.done = self.finish(self.ids), True
        elif self.preview_every and preview_after(step, self.steps, self.preview_every):
            self.outbox.append(("preview", step + 1, self.steps, self.ids.clone()))  # the steps run, not asked


class EditTask(Task):
    """Mask-free editing (muse.editing.edit_tokens, one iteration per call): resample a random
    `fraction` of each row's tokens under the prompt, with constant guidance and top-k."""

    def setup(self, model, source: torch.Tensor, iterations: int, fraction: float, scale: torch.Tensor,
              generators: list[torch.Generator], top_k: int | None = 3,
              finish: Callable[[torch.Tensor], Any] | None = None) -> None:
        B, dev = self.rows, scale.device
        self.cur = source.reshape(B, -1).long().to(dev)
        self.mask_id, self.scale, self.top_k, self.finish = model.mask_token_id, scale, top_k, finish
        self.iterations, self.it = iterations, 0
        N = self.cur.shape[1]
        self.n_pick = (torch.full((B,), N, device=dev).float() * fraction).round().clamp(min=1).long()
        self.draws = sampling.row_uniforms(generators, (B, iterations, 2, N), dev)  # [which positions, sample]

    def inputs(self) -> Step:
        ranks = self.draws[:, self.it, 0].argsort(dim=1).argsort(dim=1)
        self.pick = ranks < self.n_pick[:, None]  # a random n_pick positions per row
        inputs = torch.where(self.pick, torch.full_like(self.cur, self.mask_id), self.cur)
        return Step(inputs, self.pick, self.scale, self.guided)

    def advance(self, logits: torch.Tensor) -> None:
        sampled, _ = sampling.sample_tokens(logits, self.draws[:, self.it, 1][self.pick], top_k=self.top_k)
        self.cur = self.cur.masked_scatter(self.pick, sampled)
        self.it += 1
        if self.it == self.iterations:
            self.result, self.done = self.finish(self.cur), True


@dataclass
class Stats:
    rows_per_forward: Counter = field(default_factory=Counter)  # rows of the budget per shared forward
    tasks_per_forward: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # completed / cancelled / failed


class Scheduler:
    """Runs tasks on `model` in shared steps of at most `max_rows` rows. Model work runs in one
    worker thread at a time, so the replica's event loop keeps accepting requests meanwhile."""

    def __init__(self, model, max_rows: int, wait_s: float = 0.0):
        self.model, self.max_rows, self.wait_s = model, max_rows, wait_s
        self.waiting: deque[Task] = deque()
        self.active: list[Task] = []
        self.stats = Stats()
        self.last_progress = time.monotonic()  # last finished step, or the start of work after idle
        self._loop_task: asyncio.Task | None = None

    async def run(self, task: Task) -> Any:
        """The task's result; cancelling the caller takes it out at the next step."""
        async for kind, *payload in self.events(task):
            if kind == "done":
                return payload[0]

    async def events(self, task: Task) -> AsyncIterator[tuple]:
        """("admitted",), then ("preview", step, steps, ids) for streams, then ("done", result); the
        task's error is raised. Leaving the iteration early cancels the task."""
        task.events = asyncio.Queue()
        self.waiting.append(task)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop())
        try:
            while True:
                event = await task.events.get()
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "done":
                    return
        finally:
            if not task.done:
                task.cancelled = True  # leaves at the next step boundary
                if task in self.waiting:
                    self.waiting.remove(task)
                    self._finish(task, "cancelled")

    @property
    def in_flight_rows(self) -> int:
        return sum(t.cost for t in self.active)

    async def _loop(self) -> None:
        self.last_progress = time.monotonic()  # idle time before this is not a stall
        try:
            await self._drain()
        except BaseException as e:  # a scheduler bug (or shutdown): fail what it holds, never hang callers
            for task in [*self.active, *self.waiting]:
                if not task.done:
                    task.fail(e if isinstance(e, Exception) else RuntimeError("the scheduler stopped"))
                    self._deliver(task)
            self.active.clear()
            self.waiting.clear()
            raise

    async def _drain(self) -> None:
        while self.waiting or self.active:
            if not self.active and self.wait_s:
                await asyncio.sleep(self.wait_s)  # idle: let concurrent arrivals form one batch
            for task in [t for t in self.active if t.cancelled]:
                self.active.remove(task)
                self._finish(task, "cancelled")
            admitted = []
            while self.waiting and (not self.active and not admitted
                                    or self.in_flight_rows + sum(t.cost for t in admitted) + self.waiting[0].cost
                                    <= self.max_rows):
                admitted.append(self.waiting.popleft())
            if admitted:
                await asyncio.to_thread(self._prepare, admitted)
                for task in admitted:
                    if task.error is None:  # a task done at setup (nothing to decode) was admitted too
                        task.events.put_nowait(("admitted",))
                    self._deliver(task)
                    if not task.done:
                        self.active.append(task)
            if not self.active:
                continue
            step = list(self.active)
            self.stats.rows_per_forward[sum(t.cost for t in step)] += 1
            self.stats.tasks_per_forward[len(step)] += 1
            await asyncio.to_thread(self._step, step)
            self.last_progress = time.monotonic()
            for task in step:
                self._deliver(task)
                if task.done and task in self.active:
                    self.active.remove(task)

    def _deliver(self, task: Task) -> None:
        for event in task.outbox:
            task.events.put_nowait(event)
        task.outbox.clear()
        if task.done:
            if task.error is not None:
                task.events.put_nowait(("error", task.error))
                self.stats.outcomes["failed"] += 1
            else:
                task.events.put_nowait(("done", task.result))
                self.stats.outcomes["completed"] += 1

    def _finish(self, task: Task, outcome: str) -> None:
        task.done = True
        self.stats.outcomes[outcome] += 1

    @torch.no_grad()
    def _prepare(self, tasks: list[Task]) -> None:
        for task in tasks:
            try:
                task.prepare()
            except Exception as e:  # noqa: BLE001 - this task's inputs: it alone fails
                task.fail(e)

    @torch.no_grad()
    def _step(self, tasks: list[Task]) -> None:
        """One forward over every task's rows, then each task's update. A failed shared forward is
        re-run per task, so one bad task does not fail the others."""
        try:
            inputs = [t.inputs() for t in tasks]
            logits = self._forward(tasks, inputs)
        except Exception as e:  # noqa: BLE001 - sorted out below
            if len(tasks) == 1:
                tasks[0].fail(e)
                return
            for task in tasks:
                self._step([task])
            return
        for task, part in zip(tasks, logits):
            try:
                task.advance(part)
            except Exception as e:  # noqa: BLE001 - this task's update: it alone fails
                task.fail(e)

    def _forward(self, tasks: list[Task], inputs: list[Step]) -> list[torch.Tensor]:
        """Logits at each task's selected positions (M_i, K), from one forward of every task's
        conditional rows and the unconditional rows of the tasks guided at this step only, so a
        forward holds the rows the budget counted; guidance is `sampling.guided_logits`' mix."""
        guided = [i for i, s in enumerate(inputs) if s.guided]
        parts = [*range(len(tasks)), *guided]  # the conditional rows of every task, then the unconditional
        context = ContextStack([tasks[i].context for i in range(len(tasks))] + [tasks[i].uncond for i in guided],
                               [tasks[i].rows for i in parts])
        ids = torch.cat([inputs[i].ids for i in parts])
        select = torch.cat([inputs[i].select for i in parts])
        logits = self.model(ids, context, select=select)
        if logits.dtype == torch.float16 and guided:  # as guided_logits: fp16 would overflow at a large scale
            logits = logits.float()
        logits = logits.split([int(inputs[i].select.sum()) for i in parts])
        out = list(logits[:len(tasks)])
        for i, uncond in zip(guided, logits[len(tasks):]):
            s = inputs[i]
            weight = (1 + s.weight).to(uncond.dtype)[:, None].expand_as(s.select)[s.select][:, None]
            out[i] = uncond.lerp_(out[i], weight)  # uncond + (1 + t)(cond - uncond), as guided_logits
        return out

