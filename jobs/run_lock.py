"""One driver per training run: `jobs.fit.fit_stage` holds a lock on the run folder (ROOT/runs/<name>,
or run.storage_path/<name>) from before its checks until the run ends, so a second driver started for
the same run is refused at once (`RunRefused`) instead of training beside it, where each deletes the
other's checkpoints (Ray Train's num_to_keep) until one fails on a checkpoint that is gone.

Mirrors tokenize's heartbeat (`pipelines.output_runs.Heartbeat`). S3 has no atomic create, so each
driver writes a claim of its own, `_active-<token>.json` (host, pid), waits `claim_wait`, then lists
the claims in the folder:

- a claim whose heartbeat is older than STALE_SECONDS, or whose driver ran on this host and is
  gone, is a dead driver's: deleted, with a line saying so;
- a live claim that holds the run, or that was written before ours (store time, then token), wins:
  ours is deleted and this run refused;
- otherwise ours is rewritten as held, and a daemon thread rewrites it every HEARTBEAT_SECONDS until
  `RunLock.release` deletes it. A killed driver leaves it to age.

A driver taken for dead may only have been silent (stopped with Ctrl-Z, storage unreachable): its
next beat finds its claim gone and stops the driver as Ctrl-C does (`taken_over` then says why), so
that two drivers never go on training one run.

Ages are on the store's clock (file mtime, S3 LastModified) against our own claim's, so machines whose
clocks disagree do not matter. The wait lets a claim written at the same time land before we list
(and outlasts S3's whole-second LastModified, so two claims of one second see each other).
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from jobs.preflight import RunRefused
from jobs.progress import say
from muse import storage
from pipelines.output_runs import as_utc, driver_gone

PREFIX, SUFFIX = "_active-", ".json"  # a claim in the run folder: PREFIX + token + SUFFIX
HEARTBEAT_SECONDS = 30.0  # how often the holder rewrites its claim
STALE_SECONDS = 6 * HEARTBEAT_SECONDS  # a claim not rewritten for this long is a dead driver's
CLAIM_WAIT_LOCAL = 0.5  # covers another claim's write (fsync, rename) in flight while we list
CLAIM_WAIT_S3 = 2.0  # and on S3 a PUT in flight plus LastModified's whole seconds

log = logging.getLogger(__name__)
_held: set[RunLock] = set()  # this process's locks, for `release_all` on a stop that leaves threads behind
_held_lock = threading.Lock()
_taken_over: list[str] = []  # why this process was stopped: its lock was taken over (see `taken_over`)


@dataclass(frozen=True)
class Claim:
    token: str
    uri: str
    mtime: datetime  # the store's clock
    who: dict


class RunLock:
    """A held run folder; `release` (always, in a finally) stops the heartbeat and deletes the claim."""

    def __init__(self, folder: str, name: str, token: str, interval: float, stale: float):
        self.folder, self.name, self.token, self.interval, self.stale = folder, name, token, interval, stale
        self.uri = storage.join(folder, PREFIX + token + SUFFIX)
        self.beats = 0
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # a beat in flight never re-creates the claim after release
        self._thread: threading.Thread | None = None

    def write(self, state: str) -> None:
        self.beats += 1
        storage.write_text(self.uri, json.dumps({
            "token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "state": state,
            "beats": self.beats, "interval": self.interval, "at": time.time()}))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"run-lock-{self.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._mutex:
                    if self._stop.is_set():
                        return
                    if not storage.exists(self.uri):  # taken for dead: writing it again would make two holders
                        _taken_over.append(
                            f"[{self.name}] another driver took over {self.folder}: this driver's heartbeat had been "
                            f"silent for over {self.stale:.0f}s, so it was taken for dead. This driver stops so that "
                            "only one trains the run; its registered checkpoints stay")
                        if not _interrupt_main():
                            say(f"[{self.name}] warning: another driver took over {self.folder}, and this process "
                                "handles neither SIGINT nor SIGTERM to stop itself: stop it, or two drivers train "
                                "this run")
                        return
                    self.write("held")
            except Exception as e:  # noqa: BLE001 - a failed beat (after the S3 client's retries) is tried again next time
                log.warning("run lock %s: heartbeat not written: %s", self.uri, e)

    def release(self) -> None:
        """Stop beating and delete our claim (only ours: another driver's claim has its own name).
        Never raises: a claim left behind ages out, and must not hide how the run ended."""
        with _held_lock:
            _held.discard(self)
        self._stop.set()
        try:
            with self._mutex:
                storage.delete(self.uri)
        except Exception as e:  # noqa: BLE001
            log.warning("run lock %s: not deleted (it ages out in %.0fs): %s", self.uri, self.stale, e)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


def claim(folder: str, name: str, section: str, *, interval: float = HEARTBEAT_SECONDS,
          stale: float = STALE_SECONDS, claim_wait: float | None = None) -> RunLock:
    """Take the run folder `folder` for this driver (run `name`, config `section` for the way out),
    or raise RunRefused naming the driver that trains it. The caller releases the lock."""
    lock = RunLock(folder, name, uuid.uuid4().hex, interval, stale)
    if claim_wait is None:
        claim_wait = CLAIM_WAIT_S3 if storage.is_s3(folder) else CLAIM_WAIT_LOCAL
    lock.write("claiming")
    try:
        time.sleep(claim_wait)
        claims = _claims(folder)
        mine = next((c for c in claims if c.token == lock.token), None)
        if mine is None:
            raise RunRefused(f"[{name}] the claim on {folder} was deleted while taking it: another driver took "
                             f"the run over. Wait for it to end, or pass --set {section}.run.name=NEW to train a new run")
        winner = None
        for c in sorted(claims, key=lambda c: (c.mtime, c.token)):
            if c.token == lock.token:
                continue
            age = (mine.mtime - c.mtime).total_seconds()
            if age >= stale or driver_gone(c.who):
                _take_over(c, folder, name, age)
            elif winner is None and (c.who.get("state") == "held" or (c.mtime, c.token) < (mine.mtime, mine.token)):
                winner = (c, age)
        if winner is not None:
            c, age = winner
            raise RunRefused(
                f"[{name}] another run is training {folder}: host {c.who.get('host', '?')}, pid {c.who.get('pid', '?')}, "
                f"heartbeat {max(age, 0.0):.0f}s ago (a running driver beats every {interval:.0f}s; one silent for "
                f"{stale:.0f}s is taken for dead). Wait for it to end, or pass --set {section}.run.name=NEW to "
                "train a new run")
        lock.write("held")
    except BaseException:
        lock.release()  # a refused or interrupted claim leaves nothing behind
        raise
    with _held_lock:
        _held.add(lock)
    lock.start()
    return lock


def _interrupt_main() -> bool:
    """Stop the main thread as a stop signal does (KeyboardInterrupt: the commands' stop path ends the
    run and releases the locks), through whichever of SIGINT and SIGTERM Python handles here: a driver
    started in the background (nohup ... &) ignores SIGINT, and the commands turn SIGTERM into
    KeyboardInterrupt (`jobs.cluster.stop_on_sigterm`). False when neither is handled."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(signum)):
            _thread.interrupt_main(signum)
            return True
    return False


def taken_over() -> str | None:
    """Why this process was stopped, where a lock of its was taken over by another driver."""
    return _taken_over[0] if _taken_over else None


def release_all() -> None:
    """Release every lock this process holds: `train all` stopped while its trainers run in threads
    exits without them reaching their own release."""
    with _held_lock:
        held = list(_held)
    for lock in held:
        lock.release()


def _claims(folder: str) -> list[Claim]:
    """The claims in `folder` with their store times; one deleted while read (its run ended) is left out."""
    fs, path = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    found = []
    for info in infos:
        if info.type != pafs.FileType.File or not (info.base_name.startswith(PREFIX) and info.base_name.endswith(SUFFIX)):
            continue  # (a local write's temporary file ends in .tmp-*)
        uri = storage.join(folder, info.base_name)
        try:
            who = json.loads(storage.read_text(uri))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            who = {}
        mtime = as_utc(info.mtime) if info.mtime is not None else datetime.now(timezone.utc)
        token = info.base_name[len(PREFIX):-len(SUFFIX)]
        found.append(Claim(token, uri, mtime, who if isinstance(who, dict) else {}))
    return found


def _take_over(c: Claim, folder: str, name: str, age: float) -> None:
    why = (f"its heartbeat is {age:.0f}s old" if not driver_gone(c.who)
           else "its process is gone from this host")
    say(f"[{name}] taking over {folder} from a driver taken for dead (host {c.who.get('host', '?')}, "
        f"pid {c.who.get('pid', '?')}: {why})")
    try:
        storage.delete(c.uri)
    except FileNotFoundError:
        pass  # another driver took it over too: the claims decide between us
