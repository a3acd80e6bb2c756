"""A backup of a snapshot of a volume in use: the daemon owns the pool and writes
the stream, this side stores it; the restored image holds the filesystem."""
from __future__ import annotations

import os

from tests.backup.conftest import Repo, export

from .conftest import sh


def test_backup_and_restore_while_served(served, tmp_path):
    dev = served.attach()
    sh("mkfs.ext4", "-q", "-F", dev)
    mnt = served.dir("fs")
    sh("mount", dev, str(mnt))
    try:
        (mnt / "a.bin").write_bytes(os.urandom(5 << 20))
        (mnt / "note.txt").write_text("first")
        sh("sync")
        served.cli("snapshot", "create", "vm1@s1", "--freeze", str(mnt))
        (mnt / "note.txt").write_text("second")
        (mnt / "b.bin").write_bytes(os.urandom(3 << 20))
        sh("sync")
        served.cli("snapshot", "create", "vm1@s2", "--freeze", str(mnt))
        repo = Repo(served.pool, f"file://{tmp_path / 'repo'}", {})
        b1 = repo.backup("vm1@s1")
        b2 = repo.backup("vm1@s2")
        assert b2["mode"] == "incremental" and b2["stats"]["read_bytes"] < b1["stats"]["read_bytes"]
    finally:
        sh("umount", str(mnt))
    for b, ref in ((b1, "vm1@s1"), (b2, "vm1@s2")):
        out = tmp_path / f"{ref}.raw"
        repo.cli("restore", b["id"], str(out), "--verify")
        assert out.read_bytes() == export(served.pool, ref, tmp_path / "x.raw")
        sh("e2fsck", "-fn", str(out))
    look = served.dir("look")
    sh("mount", "-o", "ro,loop,noload", str(tmp_path / "vm1@s2.raw"), str(look))
    try:
        assert (look / "note.txt").read_text() == "second" and (look / "b.bin").stat().st_size == 3 << 20
    finally:
        sh("umount", str(look))
