"""A supervised, sharded, fault-tolerant batch loader over a clip dataset.

Sharding and order. The dataset's positions are split once, from ``seed``, into
``world_size`` rank shards, and each rank shard into ``num_workers`` worker shards; these
stay fixed across epochs, so the byte cache of a worker process (``cache_bytes`` of the
dataset) serves its videos again in later epochs instead of the network. Each epoch, a rank
visits its shard in an order shuffled from ``(seed, epoch, rank)`` and cuts it into batches
of ``batch_size``. Every sample is produced exactly once per epoch across all ranks and
workers; which samples form a batch, and in what order, depends on ``(seed, epoch, rank,
world_size, batch_size)`` only, never on the number of workers; the samples themselves
depend on ``(dataset seed, epoch, position)`` only.

Supervision. Workers are fork-server processes, started on first use and kept across epochs.
Each works through its own shard in the epoch's order, publishes in shared memory which
sample it is on, and sends each finished sample (as pickled numpy arrays, over a pipe, so a
dying worker cannot leave half-shared memory behind); the loader collates batches in order.
While it waits, the loader checks on every worker: one that has spent more than
``sample_timeout_s`` on one sample is killed (``"decode timed out"``), one that died
(segfault, ``os._exit``, out-of-memory kill) is noticed (``"worker died"``). The sample it
was on is recorded as skipped and a replacement worker resumes that shard right after it.
Memory is bounded: a worker runs at most ``prefetch_factor * batch_size`` samples ahead.
``num_workers=0`` loads in the calling process, without timeout protection.

Skips. A sample the dataset cannot produce (``echo.data.dataset.SampleSkipped``), a timeout or a
worker death becomes a ``Skip(uri, reason)``. Each batch carries ``batch["skipped"]``, the
skips since the previous batch; ``loader.skipped`` lists the epoch's skips. The caller names
them (a training job once per job across ranks: ``echo.train.session.SkipReport``); the
loader logs each URI once, at debug level. Once an epoch's skips exceed ``max_skipped_fraction`` of the samples
this rank attempts, iteration raises ``TooManySkipped`` listing them. Batches can be smaller
than ``batch_size`` where samples were skipped; a batch whose every sample was skipped is
not yielded (its skips ride on the next batch), so ``len_hint()`` is exact when nothing is
skipped and an upper bound otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.multiprocessing as mp

from echo.data.dataset import SampleSkipped

__all__ = [
    "Skip",
    "TooManySkipped",
    "VideoLoader",
    "collate",
    "rank_shard",
    "epoch_order",
]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often the loader checks on its workers while it waits
_MAX_UNBLAMED_RESTARTS = 3  # worker deaths outside any sample, per epoch, before giving up
_SHOWN = 100  # skips listed in a TooManySkipped message


class Skip(NamedTuple):
    """A sample left out of an epoch: the video's URI and why."""

    uri: str
    reason: str


class TooManySkipped(RuntimeError):
    """More of an epoch's samples were skipped than ``max_skipped_fraction`` allows."""

    def __init__(self, skipped: Sequence[Skip], attempted: int, max_fraction: float, epoch: int):
        self.skipped = [Skip(*s) for s in skipped]
        self.attempted = attempted
        self.max_fraction = max_fraction
        self.epoch = epoch
        lines = "\n".join(f"  {s.uri}: {s.reason}" for s in self.skipped[:_SHOWN])
        more = f"\n  ... and {len(self.skipped) - _SHOWN} more" if len(self.skipped) > _SHOWN else ""
        super().__init__(
            f"epoch {epoch}: {len(self.skipped)} of {attempted} samples skipped, more than the allowed "
            f"fraction {max_fraction:g} (--max-skipped-fraction):\n{lines}{more}"
        )

    def __reduce__(self):  # picklable, so it crosses Ray's process boundaries intact
        return (type(self), (self.skipped, self.attempted, self.max_fraction, self.epoch))


def rank_shard(n: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """The positions rank ``rank`` owns, the same every epoch; ``(about n / world_size,)`` int64."""
    return np.random.default_rng([int(seed)]).permutation(n).astype(np.int64)[rank::world_size]


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Rank ``rank``'s positions in the order it loads them in ``epoch``."""
    shard = rank_shard(n, seed, rank, world_size)
    return shard[np.random.default_rng([int(seed), int(epoch), int(rank)]).permutation(len(shard))]


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples (dicts of tensors with equal shapes per key) into one batch dict, new dim 0."""
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        values = [torch.as_tensor(s[key]) for s in samples]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch {key!r}: samples have different shapes {sorted(shapes)}")
        out[key] = torch.stack(values)
    return out


# ---------------------------------------------------------------------------------- workers


def _set_progress(progress: Any, wid: int, seq: int) -> None:
    """Publish what worker ``wid`` is doing: ``seq >= 0`` = the ``seq``-th sample of its epoch task."""
    progress[2 * wid] = -1.0  # "changing": a concurrent reader never pairs a new time with an old sample
    progress[2 * wid + 1] = time.monotonic()
    progress[2 * wid] = float(seq)


def _die_with_parent(parent: int) -> None:
    """Exit when the loader's process is gone (checked every second, in a daemon thread)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="echo-loader-parent-watch").start()


def _worker_main(wid: int, dataset: Any, tasks: Connection, out: Connection, progress: Any, ahead: int,
                 parent: int, env: dict[str, str]) -> None:
    """Worker process: run tasks ``(epoch, [(seq, position)], {seq: reason})`` until ``None``.

    Sends ``("sample", seq, numpy dict)``, ``("skip", seq, Skip)`` or ``("error", seq, text)``.
    ``env`` is the loader's environment now (the fork server's may be older: S3 endpoints).
    """
    os.environ.clear()
    os.environ.update(env)
    _die_with_parent(parent)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    outbox: queue.Queue = queue.Queue(maxsize=max(1, ahead))

    def send() -> None:
        while (item := outbox.get()) is not None:
            out.send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while (task := tasks.recv()) is not None:
        epoch, work, bad = task
        for seq, index in work:
            if seq in bad:
                item: tuple = ("skip", seq, Skip(dataset.uri(index), bad[seq]))
            else:
                _set_progress(progress, wid, seq)
                try:
                    sample = dataset.sample(index, epoch)
                    item = ("sample", seq, {k: torch.as_tensor(v).numpy() for k, v in sample.items()})
                except SampleSkipped as e:
                    item = ("skip", seq, Skip(e.uri, e.reason))
                except Exception:
                    item = ("error", seq, traceback.format_exc())
                _set_progress(progress, wid, -1)
            outbox.put(item)
            if item[0] == "error":
                break
    outbox.put(None)
    sender.join()


@dataclass
class _Worker:
    wid: int
    proc: Any
    tasks: Connection  # loader -> worker
    out: Connection  # worker -> loader
    work: deque = field(default_factory=deque)  # (seq, position) not yet received, in order
    bad: dict = field(default_factory=dict)  # seq -> reason, for a replacement to skip


class VideoLoader:
    """Batches of ``dataset`` samples for one rank; see the module docstring.

    ``dataset`` needs ``__len__``, ``uri(index) -> str`` and ``sample(index, epoch) -> dict``
    (``echo.data.dataset``). Each batch is ``collate``'s dict of stacked tensors (``(B, ...)``)
    plus ``"skipped"``: a list of ``Skip(uri, reason)``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        sample_timeout_s: float = 60.0,
        drop_last: bool = False,
        max_skipped_fraction: float = 0.01,
        prefetch_factor: int = 2,
    ):
        if batch_size < 1 or num_workers < 0 or prefetch_factor < 1:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, prefetch_factor >= 1; got {batch_size}, {num_workers}, {prefetch_factor}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 0 <= max_skipped_fraction <= 1:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.sample_timeout_s = float(sample_timeout_s)
        self.drop_last = bool(drop_last)
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.prefetch_factor = int(prefetch_factor)
        self.epoch = 0
        self.skipped: list[Skip] = []
        self.attempted = 0
        self.restarts = 0  # workers replaced over the loader's life
        self._logged: set[str] = set()
        self._workers: list[_Worker] = []
        self._progress: Any = None
        # Workers come from a fork server (a fresh interpreter), not from a fork of this
        # process: a Ray worker holds gRPC threads, locks and the raylet socket, and a child
        # forked from it can deadlock or keep a killed worker looking alive to Ray.
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["echo.data.dataset"])
        shard = rank_shard(len(dataset), self.seed, self.rank, self.world_size)
        # worker w owns every num_workers-th position of the rank's fixed shard (-1: another rank's)
        self._owner = np.full(len(dataset), -1, np.int32)
        self._owner[shard] = np.arange(len(shard)) % max(1, self.num_workers)

    # ------------------------------------------------------------------------- planning

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order (and the dataset's ``epoch`` random draws) on the next iteration."""
        self.epoch = int(epoch)

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Positions of every batch this rank loads in ``epoch`` (default: the current one)."""
        order = epoch_order(len(self.dataset), self.seed, self.epoch if epoch is None else epoch, self.rank, self.world_size)
        cut = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and cut and len(cut[-1]) < self.batch_size:
            cut.pop()
        return cut

    def len_hint(self, rank: int | None = None) -> int:
        """Batches per epoch for rank ``rank`` (default: this one); fewer only if a whole batch is skipped."""
        rank = self.rank if rank is None else rank
        n = len(range(rank, len(self.dataset), self.world_size))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # ------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        batches = self.batches(epoch)
        order = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        self.skipped = []
        self.attempted = len(order)
        results = self._in_process(epoch, order) if self.num_workers == 0 else self._from_workers(epoch, order)
        carried: list[Skip] = []
        for positions in batches:
            samples = []
            for _ in positions:
                result = next(results)
                if isinstance(result, Skip):
                    self._record(result, epoch)
                    carried.append(result)
                else:
                    samples.append(result)
            if samples:
                batch: dict[str, Any] = collate(samples)
                batch["skipped"], carried = carried, []
                yield batch
        self._check(epoch)

    def _record(self, skip: Skip, epoch: int) -> None:
        self.skipped.append(skip)
        if skip.uri not in self._logged:
            self._logged.add(skip.uri)
            log.debug("skipping %s: %s", skip.uri, skip.reason)
        self._check(epoch)

    def _check(self, epoch: int) -> None:
        """Raise once the epoch's skips exceed the allowed fraction of all its samples (possibly
        before the epoch ends: later samples cannot bring the fraction back down)."""
        if len(self.skipped) > self.max_skipped_fraction * self.attempted:
            self.close()
            raise TooManySkipped(self.skipped, self.attempted, self.max_skipped_fraction, epoch)

    def _in_process(self, epoch: int, order: np.ndarray) -> Iterator[dict[str, Any] | Skip]:
        for index in order:
            try:
                yield self.dataset.sample(int(index), epoch)
            except SampleSkipped as e:
                yield Skip(e.uri, e.reason)

    def _from_workers(self, epoch: int, order: np.ndarray) -> Iterator[dict[str, Any] | Skip]:
        if not self._workers or any(w.work or not w.proc.is_alive() for w in self._workers):
            self.close()  # first epoch, the last one abandoned midway, or a worker lost: start clean
            self._progress = self._ctx.RawArray("d", 2 * self.num_workers)
            self._workers = [self._start(wid) for wid in range(self.num_workers)]
        owners = self._owner[order].tolist()
        for w in self._workers:
            w.work = deque((seq, int(p)) for seq, (p, o) in enumerate(zip(order, owners)) if o == w.wid)
            w.bad = {}
            self._assign(w, epoch)
        unblamed = [0]
        for seq, owner in enumerate(owners):
            w = self._workers[owner]
            kind, got, body = self._receive(w, epoch, unblamed)
            if kind == "error":
                self.close()
                raise RuntimeError(f"loader worker {w.wid} failed on sample {self.dataset.uri(w.work[0][1])}:\n{body}")
            if got != seq:
                self.close()
                raise RuntimeError(f"loader worker {w.wid} sent sample {got} of epoch {epoch}, expected {seq}")
            w.work.popleft()
            yield body if kind == "skip" else {k: torch.from_numpy(v) for k, v in body.items()}

    def _start(self, wid: int) -> _Worker:
        task_recv, task_send = self._ctx.Pipe(duplex=False)
        out_recv, out_send = self._ctx.Pipe(duplex=False)
        self._progress[2 * wid] = -1.0
        proc = self._ctx.Process(
            target=_worker_main,
            args=(wid, self.dataset, task_recv, out_send, self._progress, self.prefetch_factor * self.batch_size,
                  os.getpid(), dict(os.environ)),
            name=f"echo-loader-{self.rank}-{wid}",
            daemon=True,
        )
        proc.start()
        task_recv.close()
        out_send.close()
        return _Worker(wid, proc, task_send, out_recv)

    def _assign(self, w: _Worker, epoch: int) -> None:
        w.tasks.send((epoch, list(w.work), dict(w.bad)))

    def _receive(self, w: _Worker, epoch: int, unblamed: list[int]) -> tuple:
        """The next message from ``w``, replacing any worker that dies or hangs meanwhile."""
        while True:
            try:
                if w.out.poll(_POLL_S):
                    return pickle.loads(w.out.recv_bytes())
            except (EOFError, OSError):
                w.proc.join(timeout=5)  # the worker closed its end: it is dying or dead
            for v in self._workers:
                self._supervise(v, epoch, unblamed)

    def _supervise(self, w: _Worker, epoch: int, unblamed: list[int]) -> None:
        """Replace ``w`` if it is dead, or kill and replace it if its sample ran too long."""
        if w.proc.is_alive():
            seq = self._progress[2 * w.wid]
            if seq < 0 or time.monotonic() - self._progress[2 * w.wid + 1] <= self.sample_timeout_s:
                return
            os.kill(w.proc.pid, signal.SIGKILL)
            w.proc.join()
            reason = f"decode timed out (no result after {self.sample_timeout_s:g} s)"
        else:
            w.proc.join()
            code = w.proc.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            reason = f"worker died ({how})"
        if not w.work:
            return  # nothing of this epoch is lost; the next epoch starts a fresh worker
        seq = int(self._progress[2 * w.wid])
        if seq >= 0 and any(s == seq for s, _ in w.work):
            w.bad[seq] = reason
        else:
            unblamed[0] += 1
            if unblamed[0] > _MAX_UNBLAMED_RESTARTS:
                raise RuntimeError(f"loader workers keep dying outside any sample ({reason}); giving up")
        w.tasks.close()
        w.out.close()
        fresh = self._start(w.wid)
        w.proc, w.tasks, w.out = fresh.proc, fresh.tasks, fresh.out
        self.restarts += 1
        self._assign(w, epoch)

    # -------------------------------------------------------------------------- cleanup

    def close(self) -> None:
        """Stop the workers (the next iteration starts new ones). Idle workers exit cleanly;
        busy ones (an abandoned or failed epoch) are killed."""
        for w in self._workers:
            if w.work:
                w.proc.kill()
            else:
                try:
                    w.tasks.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + 5.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.tasks.close()
            w.out.close()
        self._workers = []

    def __enter__(self) -> "VideoLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
