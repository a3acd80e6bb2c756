"""Child process of the kill -9 test: opens a pool and applies a list of operations.

    python crash_writer.py POOL OPS.json

After each operation returns it writes its index to stdout with one os.write (no
buffering), so the parent knows which operations completed before it killed us.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import apply

import blocksnap


def main() -> None:
    pool_path, ops_path = sys.argv[1], sys.argv[2]
    with open(ops_path) as f:
        ops = json.load(f)
    pool = blocksnap.Pool.open(pool_path, wait=10)
    os.write(1, b"ready\n")
    for i, op in enumerate(ops):
        apply(pool, op)
        os.write(1, b"%d\n" % i)
    pool.close()
    os.write(1, b"end\n")


if __name__ == "__main__":
    main()
