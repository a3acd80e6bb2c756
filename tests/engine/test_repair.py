"""check --repair when a whole map is gone (its root page deleted from the catalog)."""
from __future__ import annotations

import sqlite3

import blocksnap


def test_repair_drops_a_map_whose_root_page_is_missing(tmp_path):
    path = str(tmp_path / "pool")
    pool = blocksnap.Pool.create(path, size=64 << 20)
    vol = pool.create_volume("v", size=8 << 20, block_size=4096)
    vol.write(0, b"x" * 10000)
    snap = vol.snapshot("s1")
    vol.write(0, b"y" * 5000)
    vol.flush()
    root = snap.row.root
    pool.close()
    db = sqlite3.connect(f"{path}/catalog.db")
    db.execute("DELETE FROM pages WHERE id = ?", (root,))
    db.commit()
    db.close()

    pool = blocksnap.Pool.open(path)
    report = pool.check()
    assert not report["clean"] and "missing map pages" in report["errors"][0]
    fixed = pool.check(repair=True)
    assert any("v@s1" in r for r in fixed["repaired"])
    assert pool.check()["clean"]
    vol = pool.volume("v")
    assert vol.get_snapshot("s1").read(0, 4) == bytes(4)      # lost: reads as zeros
    assert vol.read(0, 5000) == b"y" * 5000                    # the live volume is intact
    assert vol.read(5000, 5000) == b"x" * 5000
    pool.close()
    pool = blocksnap.Pool.open(path)
    assert pool.check()["clean"]
    pool.close()
