"""Write-behind for live images: a write is acknowledged once it is copied into
memory, and one thread per volume hands the queued data to the engine.

Why: a loop device sends a 1 MiB write as two requests and waits for both, and
the engine's per-request Python runs one request at a time (the GIL). Done in
the FUSE callback, that Python sat on the writer's critical path. Queued, the
callback only copies (a C `memmove` that releases the GIL), the writer moves on,
and the worker hands the engine up to `CHUNK` bytes of adjacent requests at a
time: one map lookup, allocation and map update per chunk instead of per request.

What stays true (docs/fuse.md, "Write-behind"):
* Durability is unchanged: an acknowledged write was never durable before a
  flush (the map is committed only then), and fsync/flush drain the queue before
  they commit. Every daemon operation drains first, so a snapshot holds every
  write acknowledged before it was asked for.
* Reads see every acknowledged write: a read overlapping queued data waits for it.
* A full pool still fails the write that does not fit: queued writes reserve
  their space in one account per pool (SpaceGuard), and a write that would bring
  the pool within LOW_WATER of full waits for every image's queue, then goes to
  the engine itself, so ENOSPC reaches its writer.
* An error the worker meets later (EIO from the disk) fails every write until an
  fsync/flush of a writable handle reports it, once, like the page cache.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from ..errors import BlocksnapError

log = logging.getLogger("blocksnap.fuse")

CHUNK = 4 << 20          # bytes of adjacent requests the worker takes at a time
ALIGN = 1 << 20          # a chunk starts at a multiple of this in the volume
LIMIT = 8                # chunks queued per volume before writers wait
IDLE = 0.0005            # seconds an open chunk waits for the next request
LOW_WATER = 2 * CHUNK * LIMIT   # below this much free space beyond the queue: write through
KICK = 32 << 20          # bytes written by the workers between two writeback starts
SMALL = 128 << 10        # a request up to this size that continues nothing queued is written inline
# ... when INLINE is on (off: every write is queued). It was off for a while: the
# clean-clone CI run of 2026-12-03 failed the kill -9 model test once with it (a
# snapshot lacking acknowledged writes). The cause was the test, with or without
# inline writes: a `snapshot create` its writer had just started outlived the kill
# and snapshotted the pool as the crash left it (test_write_behind._kill_daemon_and_writer).
INLINE = True


def _address(view: memoryview) -> int:
    """Address of a (possibly read-only) contiguous buffer."""
    return np.frombuffer(view, np.uint8).ctypes.data


class _Chunk:
    """Queued data for [start, start + CHUNK) of the volume, newest bytes last."""

    __slots__ = ("seq", "start", "buf", "addr", "runs", "writers", "sealed", "reserved")

    def __init__(self, seq: int, start: int, buf: bytearray):
        self.seq, self.start, self.buf = seq, start, buf
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self.runs: list[list[int]] = []   # filled [lo, hi) volume ranges, sorted, disjoint
        self.writers = 0                  # copies in progress into buf
        self.sealed = False               # taken (or about to be): nothing more joins
        self.reserved = 0                 # bytes of pool space its requests may allocate

    def fits(self, offset: int, end: int) -> bool:
        return not self.sealed and self.start <= offset and end <= self.start + CHUNK

    def add_run(self, lo: int, hi: int) -> None:
        runs, merged = self.runs, [lo, hi]
        keep = []
        for r in runs:
            if r[1] < merged[0] or r[0] > merged[1]:
                keep.append(r)
            else:
                merged = [min(r[0], merged[0]), max(r[1], merged[1])]
        keep.append(merged)
        keep.sort()
        self.runs = keep


class SpaceGuard:
    """Pool space the queued writes of every image may still allocate, so that a
    write is queued only while the pool has room for it and all queued before."""

    def __init__(self, free_bytes: Callable[[], int]):
        self.free_bytes = free_bytes          # () -> bytes free in the pool now (no lock)
        self.cond = threading.Condition()
        self.reserved = 0

    def reserve(self, need: int) -> bool:
        with self.cond:
            if self.free_bytes() - self.reserved - need < LOW_WATER:
                return False
            self.reserved += need
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.reserved -= n
            if not self.reserved:
                self.cond.notify_all()

    def wait_settled(self) -> None:
        """Until every queued write of every image has taken its space: a write that
        did not fit goes to the engine after them, and ENOSPC, if it comes, is its."""
        with self.cond:
            while self.reserved:
                self.cond.wait(1.0)


class Writeback:
    """Starts writeback of the pool's files every KICK bytes the workers write.

    Without it the engine's writes pile up in the page cache and all reach the
    disk at the next flush, which then waits for every one of them. Started
    early, most are on the disk by then. From its own thread: starting writeback
    can block (the host filesystem allocates blocks), and a worker that blocks
    is a queue that fills. (Before write-behind, the same kick stalled the FUSE
    writes themselves, and was taken out.)
    """

    def __init__(self, start: Callable[[], None]):
        self.start = start
        self.written = 0
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="writeback", daemon=True)
        self.thread.start()

    def wrote(self, n: int) -> None:
        self.written += n    # (a racy count only moves a kick by a request)
        if self.written >= KICK:
            self.written = 0
            self.wake.set()

    def _run(self) -> None:
        while not self.closed:
            if not self.wake.wait(1.0):
                continue
            self.wake.clear()
            try:
                self.start()
            except Exception:
                log.exception("starting writeback failed")

    def close(self) -> None:
        self.closed = True
        self.wake.set()
        self.thread.join()


class VolumeQueue:
    """The write-behind queue of one live volume, with its worker thread.

    `delay` holds every chunk back that many seconds before the worker hands it to
    the engine: 0 in use. Tests set it, per queue, or for every queue a process
    makes through `default_delay` (which the daemon's queues take), so that a
    missing drain shows as a read, snapshot or fsync that misses queued data.
    """

    default_delay = 0.0

    def __init__(self, vol: Any, space: SpaceGuard, writeback: Writeback | None = None, *,
                 delay: float | None = None):
        self.vol = vol
        self.space = space
        self.writeback = writeback
        self.cond = threading.Condition()
        self.chunks: list[_Chunk] = []
        self.spare: list[bytearray] = []
        self.seq = 0
        self.done_seq = 0                     # every chunk up to this one is in the engine
        self.draining = 0
        self.error: BaseException | None = None
        self.closed = False
        self.delay = self.default_delay if delay is None else delay
        self.last_end = -1                    # where the last request ended (sequential runs)
        # told the volume ranges its chunks hold, and whether an error waits, under
        # cond, whenever that changes: the compiled FUSE path leaves those to Python
        self.on_pending: Callable[[list[tuple[int, int]], bool], None] = lambda r, e: None
        self.thread = threading.Thread(target=self._work, name=f"write-behind {vol.name}", daemon=True)
        self.thread.start()

    # -- the FUSE side -----------------------------------------------------------
    def write(self, offset: int, data: memoryview, queue: bool = True) -> None:
        """Queue `data` at `offset` (bounds already checked), or write it through
        (`queue` False, or the pool nearly full) after the queued data it overlaps."""
        end = offset + len(data)
        bs = self.vol.block_size
        need = (-(-end // bs) - offset // bs) * bs
        with self.cond:
            if self.error is not None:   # (a fresh traceback each time: it would grow)
                raise self.error.with_traceback(None)
            chunk = None
            full = inline = False
            if queue and not self.closed and len(data) <= CHUNK - ALIGN:   # (fits any chunk)
                full = not self.space.reserve(need)
                if INLINE and not full and len(data) <= SMALL and not self._joins(offset, end):
                    inline = True   # random small writes: a chunk each would be a queue of one
                else:
                    chunk = None if full else self._chunk_for(offset, end)
                if chunk is not None:
                    chunk.writers += 1
                    chunk.add_run(offset, end)
                    chunk.reserved += need
                elif not full and not inline:
                    self.space.release(need)   # closed meanwhile
            self.last_end = end
        if inline:
            self._write_inline(offset, data, need)
            return
        if chunk is None:
            if queue or self.overlaps(offset, end):
                self.drain()   # (nearly full: all of it, so ENOSPC is judged on the real figure)
            if full:
                self.space.wait_settled()   # the other images' queues, too
            self.vol.write(offset, data)
            if self.writeback is not None:
                self.writeback.wrote(len(data))
            return
        try:
            ctypes.memmove(chunk.addr + (offset - chunk.start), _address(data), len(data))
        finally:
            with self.cond:
                chunk.writers -= 1
                self.cond.notify_all()

    def _joins(self, offset: int, end: int) -> bool:
        """Does the request continue queued data: inside the open chunk, or where
        the previous request ended (a sequential writer of small requests)?"""
        return offset == self.last_end or bool(self.chunks and self.chunks[-1].fits(offset, end))

    def _write_inline(self, offset: int, data: memoryview, need: int) -> None:
        """A small write that continues nothing queued goes to the engine from this
        thread, after the queued writes it overlaps (several FUSE threads write in
        parallel: only the engine's lock orders them). Its space was reserved, so
        queued writes keep theirs; an error reaches this writer."""
        try:
            if self.overlaps(offset, offset + len(data)):
                self.drain()
            self.vol.write(offset, data)
        finally:
            self.space.release(need)
        if self.writeback is not None:
            self.writeback.wrote(len(data))

    def _chunk_for(self, offset: int, end: int) -> _Chunk | None:
        """The open chunk if the request fits it, else a new one (waiting for room);
        None once the queue is closed."""
        while True:
            if self.closed:
                return None
            if self.chunks and self.chunks[-1].fits(offset, end):
                return self.chunks[-1]
            if len(self.chunks) < LIMIT:
                if self.chunks:
                    self.chunks[-1].sealed = True
                self.seq += 1
                c = _Chunk(self.seq, offset - offset % ALIGN,
                           self.spare.pop() if self.spare else bytearray(CHUNK))
                self.chunks.append(c)
                self.announce()
                self.cond.notify_all()
                return c
            self.cond.wait()

    def overlaps(self, offset: int, end: int) -> bool:
        if not self.chunks:   # (no lock: a write racing this read is unordered anyway)
            return False
        with self.cond:
            return any(c.start < end and offset < c.start + CHUNK for c in self.chunks)

    def drain(self) -> None:
        """Wait until every write queued so far is in the engine."""
        with self.cond:
            target = self.seq
            self.draining += 1
            self.cond.notify_all()
            try:   # (a closed queue too: its worker finishes what it holds)
                while self.done_seq < target and self.thread.is_alive():
                    self.cond.wait(1.0)
            finally:
                self.draining -= 1

    def announce(self) -> None:
        """Tell on_pending what the queue holds (the caller holds cond)."""
        self.on_pending([(c.start, c.start + CHUNK) for c in self.chunks], self.error is not None)

    def take_error(self) -> None:
        """Raise (once) an error the worker met since the last call."""
        with self.cond:
            err, self.error = self.error, None
            self.announce()
        if err is not None:
            raise err

    def trim(self) -> None:
        """Give the spare buffers back (nobody has the image open to write)."""
        with self.cond:
            self.spare.clear()

    def close(self) -> None:
        """Drain, then stop the worker."""
        self.drain()
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()

    # -- the worker --------------------------------------------------------------
    def _next(self) -> _Chunk | None:
        with self.cond:
            while True:
                if self.closed and not self.chunks:
                    return None
                if self.chunks:
                    c = self.chunks[0]
                    if len(self.chunks) > 1 or self.draining or self.closed or c.sealed:
                        break
                    # the open chunk: while requests keep coming, let it fill up
                    if not self.cond.wait(IDLE):
                        break
                    continue
                self.cond.wait()
            c.sealed = True
            while c.writers:
                self.cond.wait()
            return c

    def _work(self) -> None:
        while True:
            c = self._next()
            if c is None:
                return
            if self.delay:
                time.sleep(self.delay)
            view = memoryview(c.buf)
            for lo, hi in c.runs:
                try:
                    self.vol.write(lo, view[lo - c.start:hi - c.start])
                except Exception as e:
                    if isinstance(e, (BlocksnapError, OSError)):
                        log.error("write-behind: %s: write at %d: %s", self.vol.name, lo, e)
                    else:
                        log.exception("write-behind: %s: write at %d failed", self.vol.name, lo)
                        e = OSError(errno.EIO, f"write at {lo} failed: {e}")
                    with self.cond:
                        if self.error is None:
                            self.error = e
                            self.announce()
            del view
            self.space.release(c.reserved)
            if self.writeback is not None:
                self.writeback.wrote(sum(hi - lo for lo, hi in c.runs))
            with self.cond:
                self.chunks.remove(c)
                self.announce()
                self.done_seq = c.seq
                if len(self.spare) < LIMIT:   # (fresh memory is slow to touch here)
                    self.spare.append(c.buf)
                self.cond.notify_all()
