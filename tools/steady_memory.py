"""Keep a virtual machine's memory backed by its host while a benchmark runs.

Some VMs (Firecracker with virtio-balloon free page reporting, as on the project's
development machine) hand free guest memory back to the host; the next time the
guest kernel uses such a page, for instance as page cache for a write, the host
must fault it in again. Measured on that machine: the kernel's copy into the page
cache ran 12 times slower in such runs, and whether a phase landed on returned
memory was a matter of luck, so the same code gave 226 or 720 MB/s from one round
to the next, whichever target it was.

While the context is open, free page reporting is paused (its order raised past
the largest free block the kernel forms) and a few GiB of memory are touched once,
so that the page cache of the benchmark lands on memory the host already backs.
The setting is put back on exit. Nothing happens where there is no page reporting.
"""
from __future__ import annotations

import contextlib
import mmap
import sys
from typing import Iterator

ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
MADV_POPULATE_WRITE = 23


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


def _max_free_order() -> int:
    """The largest block order the buddy allocator keeps (columns of /proc/buddyinfo)."""
    with open("/proc/buddyinfo") as f:
        return max(len(line.split()) - 4 - 1 for line in f if "zone" in line)


def _touch(nbytes: int) -> None:
    """Fault in `nbytes` of anonymous memory, then free it (it stays backed)."""
    chunk = 1 << 30
    for _ in range(0, nbytes, chunk):
        m = mmap.mmap(-1, chunk)
        try:
            m.madvise(MADV_POPULATE_WRITE)
        except OSError:   # kernels before 5.14: touch a byte per page
            for off in range(0, chunk, mmap.PAGESIZE):
                m[off] = 1
        m.close()


@contextlib.contextmanager
def steady_memory(touch_bytes: int, *, quiet: bool = False) -> Iterator[str]:
    """Pause free page reporting and pre-fault `touch_bytes`; yields what was done."""
    try:
        with open(ORDER) as f:
            old = f.read().strip()
    except OSError:
        yield "no free page reporting here"
        return
    off = _max_free_order() + 1
    if int(old) >= off:
        note = f"free page reporting already off (order {old})"
        old = None
    elif _write(ORDER, str(off)):
        note = f"free page reporting paused during the run (order {old} -> {off})"
    else:
        yield f"free page reporting is on (order {old}) and could not be paused: expect noise"
        return
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    nbytes = max(0, min(touch_bytes, avail - (2 << 30)))
    if not quiet:
        print(f"{note}; touching {nbytes >> 30} GiB of memory once ...", file=sys.stderr)
    _touch(nbytes)
    try:
        yield f"{note}, {nbytes >> 30} GiB pre-faulted"
    finally:
        if old is not None:
            _write(ORDER, old)
