"""Console progress for long stages: one live line per running stage, one summary line as each ends.

Ray forwards every worker's stdout to the driver, and a tqdm bar on a Ray Train worker reaches the
console twice, between Ray Train's own "Reporting training result" lines. So at the default verbosity
the workers print nothing to the console (their lines stay in Ray's log files): the rank-0 worker of a
stage sends its progress to a small `Board` actor, and the driver draws from it

    vqgan_lo          1200/2000 steps      9.8 step/s  ETA 1m22s  psnr 24.1
    tokenize              12/16 parts      0.9 part/s  ETA 0m04s
    ✓ vqgan_hi     400 steps (400 this run) in 2m05s, loss 0.04, psnr 27.3; exported to ROOT

redrawn in place on a terminal, and as plain lines every `interval` seconds otherwise (a CI log, or
`ray job submit`, whose driver output is a log). `--verbose` (or MUSE_VERBOSE=1) turns this off and
brings back Ray's own logs and the workers' lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

VERBOSE_ENV = "MUSE_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """`--verbose` of every entry point; the environment carries it to Ray workers started later."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def ray_init_kwargs() -> dict[str, Any]:
    """ray.init arguments for the console: quiet unless verbose."""
    if verbose():
        return {}
    # A local Ray on a small machine runs more worker processes than cores by design (fractional-CPU
    # actor pools, two training stages side by side), which the raylet reports as a warning once they
    # reach 4x its start-up concurrency (the core count); read when ray.init starts the raylet,
    # ignored when joining a cluster.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, os.cpu_count() or 1)))
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def quiet_ray_loggers() -> None:
    """Ray's driver-side lines (Serve deploys, Data plans and their warnings about settings chosen on
    purpose, Train runs) are noise at the default verbosity; errors still show."""
    if verbose():
        return
    for name in ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def done_so_far(state: dict, width: int = 0) -> str:
    """'done/total unit' of a running stage's state ('done/total' right-aligned in `width`)."""
    done, total = state.get("done", 0), state.get("total")
    return f"{str(done) + ('/' + str(total) if total else ''):>{width}} {state.get('unit', 'steps')}"


def progress_line(name: str, state: dict, name_width: int = 12) -> str:
    """'name  done/total unit  rate  ETA  metric value ...' for one running stage."""
    done, total = state.get("done", 0), state.get("total")
    rate, rate_unit = state.get("rate"), state.get("rate_unit", "step/s")
    parts = [f"{name:<{name_width}}", done_so_far(state, width=13)]
    if rate:
        parts.append(f"{rate:7.1f} {rate_unit}")
        if total:
            parts.append(f"ETA {format_seconds((total - done) / rate)}")
    if state.get("status"):
        parts.append(state["status"])
    parts += [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in state.get("metrics", {}).items()]
    return "  ".join(parts)


class Board:
    """What the live lines are drawn from: the state of each running stage and the finished summaries.
    Runs as a Ray actor so that Ray Train workers anywhere in the cluster can post."""

    def __init__(self):
        self.states: dict[str, dict] = {}
        self.finished: list[str] = []
        self.attempts: dict[str, int] = {}

    def update(self, name: str, state: dict) -> None:
        self.states[name] = state

    def finish(self, name: str, summary: str) -> None:
        self.states.pop(name, None)
        self.finished.append(f"✓ {name:<12} {summary}")

    def note(self, line: str) -> None:
        self.finished.append(line)

    def attempt_failed(self, name: str, line: str, status: str) -> None:
        """A failed attempt's console line; its live line keeps the step reached, with `status` in place
        of a rate and ETA that no longer hold, until the next attempt reports."""
        self.finished.append(line)
        if name in self.states:
            state = {k: v for k, v in self.states[name].items() if k not in ("rate", "metrics")}
            self.states[name] = state | {"status": status}

    def attempt_started(self, name: str) -> int:
        """Count an attempt of run `name` (Ray Train's first start or a restart); its number under
        this driver."""
        self.attempts[name] = self.attempts.get(name, 0) + 1
        return self.attempts[name]

    def poll(self, seen: int) -> tuple[dict[str, dict], list[str]]:
        """(running states, summaries after the first `seen`)."""
        return dict(self.states), self.finished[seen:]


_board = None
_display: Display | None = None
_lock = threading.Lock()


def board():
    """This driver's ProgressBoard actor (created on first use; Ray must be initialised)."""
    global _board
    with _lock:
        if _board is None:
            import ray

            from jobs.placement import on_this_node

            # One thread: a threaded actor runs a caller's calls out of order, and a summary must not
            # show up after the lines the driver said once it was done.
            _board = ray.remote(num_cpus=0)(Board).options(max_concurrency=1, **on_this_node()).remote()
        return _board


class Display:
    """Driver thread that draws the board: in place on a terminal, as periodic lines otherwise."""

    def __init__(self, poll, stream=None, interval: float | None = None):
        """poll(seen) -> (running states, summaries after the first `seen`), e.g. Board.poll."""
        self.poll, self.stream = poll, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.seen, self.drawn, self.last_plain = 0, 0, 0.0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="muse-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(0.5 if self.tty else 1.0):
            self.draw()
        self.draw(final=True)

    def draw(self, final: bool = False) -> None:
        try:
            states, finished = self.poll(self.seen)
        except Exception:  # the board went with a Ray shutdown; nothing left to draw
            return
        self.seen += len(finished)
        # Run names are the user's (`run.name`): the column widens for a long one, so the lines align.
        width = max([12, *map(len, states)])
        lines = [progress_line(name, state, width) for name, state in states.items()]
        if self.tty:
            out = "\x1b[1A\x1b[2K" * self.drawn  # up and clear the previous live lines
            out += "".join(f"{line}\n" for line in finished)
            live = [] if final else lines
            out += "".join(f"\x1b[2K{line}\n" for line in live)
            self.drawn = len(live)
            self.stream.write(out)
        else:
            out = "".join(f"{line}\n" for line in finished)
            now = time.time()
            if lines and not final and now - self.last_plain >= self.interval:
                out += "".join(f"  {line}\n" for line in lines)
                self.last_plain = now
            self.stream.write(out)
        self.stream.flush()

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=15)


def start_display() -> Any | None:
    """Start drawing this driver's board (once); returns the board handle for workers, or None when
    verbose (then workers print their own lines) or when Ray is not running here."""
    global _display
    import ray

    if verbose() or not ray.is_initialized():
        return None
    handle = board()
    with _lock:
        if _display is None:
            _display = Display(lambda seen: ray.get(handle.poll.remote(seen), timeout=10))
    return handle


def stop_display() -> bool:
    """Draw what is left and stop (before Ray shuts down); whether a display was drawing."""
    global _display, _board
    with _lock:
        display, _display = _display, None
    if display is not None:
        display.close()
    _board = None
    return display is not None


def running_now() -> dict[str, str]:
    """What the board shows running, by name ({"base": "base at 78/300 steps"}), for a command's last
    line when it is stopped; empty without a board, or when it does not answer at once."""
    with _lock:
        handle = _board
    if handle is None:
        return {}
    try:
        import ray

        states = ray.get(handle.poll.remote(0), timeout=2)[0]
    except Exception:
        return {}
    return {name: f"{name} at {done_so_far(state)}" for name, state in states.items()}


def say(line: str) -> None:
    """Print a line on the driver's console; above the live lines while they are drawn."""
    with _lock:
        active = _display is not None
    if active:
        _board.note.remote(line)
    else:
        print(line, flush=True)


class Reporter:
    """What a stage posts: `update(done, metrics)` at most every `every` seconds, `finish(summary)`.
    With no board handle (verbose, or no Ray) it does nothing: the caller's own prints are the log.
    Without `live` (`--no-progress`: logs, CI) it posts the summary only, no live line."""

    def __init__(self, handle, name: str, total: int | None, unit: str = "steps", rate_unit: str = "step/s",
                 every: float = 1.0, start_done: int = 0, live: bool = True):
        self.handle, self.name, self.total, self.unit, self.rate_unit = handle, name, total, unit, rate_unit
        self.every, self.last, self.live = every, 0.0, live
        self.mark, self.mark_done, self.rate = time.time(), start_done, None

    def update(self, done: int, metrics: dict[str, Any] | None = None, force: bool = False) -> None:
        if self.handle is None or not self.live:
            return
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        if self.rate is None:  # the first post: the time before it is start-up, not a rate
            self.mark, self.mark_done, self.rate = now, done, 0.0
        elif done > self.mark_done:  # a smoothed recent rate
            recent = (done - self.mark_done) / max(now - self.mark, 1e-9)
            self.rate = recent if not self.rate else 0.7 * self.rate + 0.3 * recent
            self.mark, self.mark_done = now, done
        rate = self.rate
        # Metrics may be device tensors: converted here, at most once per `every` seconds.
        state = {"done": done, "total": self.total, "unit": self.unit, "rate": rate, "rate_unit": self.rate_unit,
                 "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
        self.handle.update.remote(self.name, state)

    def finish(self, summary: str) -> None:
        if self.handle is not None:
            self.handle.finish.remote(self.name, summary)
