"""Tests only: the daemon's write-behind worker holds each chunk back a while.

tests/fuse/test_write_behind.py puts this directory on PYTHONPATH, with
BLOCKSNAP_TEST_WRITE_BEHIND_DELAY=SECONDS, in the environment of the `blocksnap
serve` it runs. The daemon that command starts inherits both, and Python imports
this module as it starts (site.py), before blocksnap builds a queue. The delay is
VolumeQueue's `default_delay` (0 in use): blocksnap itself reads no such variable.
"""
import os

_delay = os.environ.get("BLOCKSNAP_TEST_WRITE_BEHIND_DELAY")
if _delay:
    from blocksnap.fuse.write_behind import VolumeQueue

    VolumeQueue.default_delay = float(_delay)
