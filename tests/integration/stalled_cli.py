"""The real `blocksnap` command line with one injected stall, to kill -9 `snapshot create`
at the worst instant: everything quiesced and frozen, the snapshot not taken yet.

The request that takes the snapshot (`snapshot_create`, sent to the pool's daemon from
inside the frozen window) writes $BLOCKSNAP_TEST_STALL_READY (its own pid) and then
sleeps instead of being sent. Everything else is the unmodified CLI.

    python stalled_cli.py --pool P snapshot create vol@s --freeze MNT --mysql URL
"""
from __future__ import annotations

import os
import sys
import time

from blocksnap.service import runner

_real_try_remote = runner.try_remote


def _stalled_try_remote(pool_path, op, args):
    if op == "snapshot_create":
        ready = os.environ["BLOCKSNAP_TEST_STALL_READY"]
        with open(ready + ".tmp", "w") as f:  # not on the frozen filesystem (the test's /tmp dir)
            f.write(str(os.getpid()))
        os.rename(ready + ".tmp", ready)
        time.sleep(600)
    return _real_try_remote(pool_path, op, args)


runner.try_remote = _stalled_try_remote

if __name__ == "__main__":
    from blocksnap.cli.main import run

    run(sys.argv[1:])
