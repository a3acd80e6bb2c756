"""The command line as users run it (`python -m blocksnap`, a real subprocess): the
happy paths of pool, volume, snapshot, export, check and scrub, their --json output,
and quiet/piped output without progress bars."""
from __future__ import annotations

import filecmp
import json
import os
import pty
import random
import select
import subprocess
import sys

import pytest

import blocksnap
from blocksnap.errors import AlreadyExists

from ..conftest import assert_cli_error, run_cli

K = 1 << 10
M = 1 << 20
G = 1 << 30


def ok(pool, *args, **kw) -> str:
    """Run a command that must succeed quietly on stderr; return its stdout."""
    res = run_cli(pool, *args, **kw)
    assert res.returncode == 0, (args, res.returncode, res.stdout, res.stderr)
    assert res.stderr == "", res.stderr
    assert "Traceback" not in res.stdout
    return res.stdout


def js(pool, *args):
    return json.loads(ok(pool, *args, "--json"))


@pytest.fixture
def cpool(tmp_path):
    """A pool made by `pool init`."""
    path = tmp_path / "pool"
    out = ok(path, "pool", "init", "--size", "64M")
    assert out.startswith(f"created pool {path}")
    return path


def sparse_image(path, size: int, extents: list[tuple[int, bytes]]) -> bytes:
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)
            content[off:off + len(data)] = data
    return bytes(content)


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- pool ----------------------------------------------------------------------------------

def test_pool_init_and_status(tmp_path, cpool):
    st = js(cpool, "pool", "status")
    assert st["size"] == 63 * M  # the first MiB holds the header
    assert st["used"] == 0 and st["free"] == st["size"]
    assert st["volumes"] == 0 and st["snapshots"] == 0
    assert st["health"] == "ok"
    assert st["data"] == str(cpool / "data") and st["data_is_device"] is False
    assert st["volume_list"] == []
    text = ok(cpool, "pool", "status")
    assert "size:" in text and "63M" in text and "health:    ok" in text

    # BLOCKSNAP_POOL instead of --pool
    res = run_cli(None, "pool", "status", "--json", env={"BLOCKSNAP_POOL": str(cpool)})
    assert res.returncode == 0 and json.loads(res.stdout)["pool"] == str(cpool)

    # --json on init
    init = json.loads(ok(tmp_path / "p2", "pool", "init", "--size", "16M", "--json"))
    assert init["size"] == 15 * M and init["used"] == 0


def test_pool_init_with_data_image(tmp_path):
    img = tmp_path / "store.img"
    with open(img, "wb") as f:
        f.truncate(32 * M)
    path = tmp_path / "pool"
    ok(path, "pool", "init", "--data", img)
    st = js(path, "pool", "status")
    assert st["data"] == str(img) and st["size"] == 31 * M
    assert not (path / "data").exists()
    # a new image file of a given size
    path2 = tmp_path / "pool2"
    ok(path2, "pool", "init", "--data", tmp_path / "new.img", "--size", "24M")
    assert os.path.getsize(tmp_path / "new.img") == 24 * M
    assert js(path2, "pool", "status")["size"] == 23 * M
    ok(path2, "volume", "create", "v", "--size", "1M")
    assert ok(path2, "check").strip() == "clean"


# -- volumes -------------------------------------------------------------------------------

def test_volume_create_list_show_resize_delete(cpool):
    info = js(cpool, "volume", "create", "vm1", "--size", "10M", "--block-size", "16K")
    assert (info["name"], info["mode"], info["size"], info["block_size"]) == ("vm1", "row", 10 * M, 16 * K)
    assert info["allocated"] == 0 and info["snapshots"] == [] and info["origin"] is None
    out = ok(cpool, "volume", "create", "vm2", "--size", "1G")
    assert out.strip() == "created row volume vm2 (1G)"
    assert js(cpool, "volume", "show", "vm2")["block_size"] == 64 * K  # the default

    vols = js(cpool, "volume", "list")
    assert [v["name"] for v in vols] == ["vm1", "vm2"]
    table = ok(cpool, "volume", "list").splitlines()
    assert table[0].split()[:3] == ["NAME", "MODE", "SIZE"]
    assert table[1].split()[:3] == ["vm1", "row", "10M"]
    shown = ok(cpool, "volume", "show", "vm1")
    assert "vm1" in shown and "16K" in shown

    assert js(cpool, "volume", "resize", "vm1", "20M")["size"] == 20 * M
    assert js(cpool, "volume", "show", "vm1")["size"] == 20 * M
    assert js(cpool, "volume", "resize", "vm1", "5M", "--shrink")["size"] == 5 * M
    assert ok(cpool, "volume", "resize", "vm1", "6M").strip() == "resized vm1 to 6M"

    assert ok(cpool, "volume", "delete", "vm2").strip() == "deleted volume vm2"
    assert [v["name"] for v in js(cpool, "volume", "list")] == ["vm1"]
    assert js(cpool, "pool", "status")["volumes"] == 1
    ok(cpool, "snapshot", "create", "vm1@s")
    ok(cpool, "volume", "delete", "-r", "vm1")
    assert js(cpool, "volume", "list") == []
    assert js(cpool, "snapshot", "list") == []


@pytest.mark.parametrize("text,size", [("512", 512), ("64K", 64 * K), ("10G", 10 * G), ("1T", 1 << 40),
                                       ("3M", 3 * M)])
def test_sizes(cpool, text, size):
    assert js(cpool, "volume", "create", "v", "--size", text)["size"] == size
    assert js(cpool, "pool", "status")["used"] == 0  # thin


def test_import_export_roundtrip_keeps_holes(cpool, tmp_path):
    src = tmp_path / "disk.img"
    bs = 64 * K
    content = sparse_image(src, 16 * M, [(0, rand(100 * K, 1)), (5 * M + 3, rand(10, 2)),
                                         (9 * M, bytes(1 * M)), (16 * M - 512, rand(512, 3))])
    info = js(cpool, "volume", "import", "disk", src, "--block-size", "64K")
    assert info["size"] == 16 * M
    # blocks 0,1 (100K), the one at 5M, the last one: 4 blocks; the explicit zeros: none
    assert info["allocated"] == 4 * bs
    assert js(cpool, "pool", "status")["used"] == 4 * bs

    ok(cpool, "snapshot", "create", "disk@orig")
    out = tmp_path / "export.img"
    text = ok(cpool, "export", "disk@orig", out)
    assert text.startswith(f"exported disk@orig to {out}")
    assert filecmp.cmp(src, out, shallow=False)
    assert os.path.getsize(out) == 16 * M
    assert os.stat(out).st_blocks * 512 <= 4 * bs + 64 * K  # holes stay holes

    # an existing file needs --force
    res = run_cli(cpool, "export", "disk@orig", out)
    assert_cli_error(res, AlreadyExists.exit_code, "exists", "--force")
    rep = js(cpool, "export", "disk@orig", out, "--force")
    assert rep["size"] == 16 * M and rep["written"] <= 4 * bs
    assert filecmp.cmp(src, out, shallow=False)
    with open(out, "rb") as f:
        assert f.read() == content


def test_snapshot_commands(cpool, tmp_path):
    bs = 16 * K
    ok(cpool, "volume", "create", "vm1", "--size", "4M", "--block-size", "16K")
    first = rand(1 * M, 10)
    with blocksnap.Pool.open(str(cpool)) as pool:
        pool.volume("vm1").write(0, first)

    s1 = js(cpool, "snapshot", "create", "vm1@s1", "--label", "ticket=42", "--label", "who=me")
    assert s1["ref"] == "vm1@s1" and s1["labels"] == {"ticket": "42", "who": "me"}
    assert s1["consistency"] == "crash" and s1["size"] == 4 * M and s1["seq"] == 1
    assert ok(cpool, "snapshot", "create", "vm1@s2").strip() == "created snapshot vm1@s2 (crash)"
    ok(cpool, "volume", "create", "other", "--size", "1M")
    ok(cpool, "snapshot", "create", "other@x")

    assert [s["ref"] for s in js(cpool, "snapshot", "list")] == ["other@x", "vm1@s1", "vm1@s2"]
    assert [s["ref"] for s in js(cpool, "snapshot", "list", "vm1")] == ["vm1@s1", "vm1@s2"]
    listing = ok(cpool, "snapshot", "list", "vm1")
    assert "vm1@s1" in listing and "ticket=42" in listing
    show = js(cpool, "snapshot", "show", "vm1@s1")
    assert show["labels"] == {"ticket": "42", "who": "me"} and show["block_size"] == bs
    assert show["created_iso"].endswith("Z") and show["mode"] == "row"
    assert "vm1@s1" in ok(cpool, "snapshot", "show", "vm1@s1")

    # change blocks 2, 3 (one write across them) and 100 of the live volume
    with blocksnap.Pool.open(str(cpool)) as pool:
        vol = pool.volume("vm1")
        vol.write(2 * bs + 100, b"x" * bs)
        vol.write(100 * bs, b"y")
    d = js(cpool, "snapshot", "diff", "vm1@s1")
    assert d["extents"] == [{"offset": 2 * bs, "length": 2 * bs}, {"offset": 100 * bs, "length": bs}]
    assert d["changed_bytes"] == 3 * bs and d["block_size"] == bs and d["to"] == "vm1"
    assert js(cpool, "snapshot", "diff", "vm1@s1", "vm1@s2")["extents"] == []
    ok(cpool, "snapshot", "create", "vm1@s3")
    d13 = js(cpool, "snapshot", "diff", "vm1@s1", "vm1@s3")
    assert d13["extents"] == d["extents"]
    assert js(cpool, "snapshot", "diff", "vm1@s3", "vm1@s1")["extents"] == d["extents"]
    text = ok(cpool, "snapshot", "diff", "vm1@s1", "vm1@s3")
    assert f"{2 * bs}\t{2 * bs}" in text and "2 extent(s)" in text

    # clone: a writable volume with the snapshot's content, independent of vm1
    ok(cpool, "snapshot", "clone", "vm1@s3", "vm1-test")
    info = js(cpool, "volume", "show", "vm1-test")
    assert info["mode"] == "row" and info["size"] == 4 * M and info["block_size"] == bs
    used_before = js(cpool, "pool", "status")["used"]
    with blocksnap.Pool.open(str(cpool)) as pool:
        clone = pool.volume("vm1-test")
        assert clone.read(0, 1 * M) == pool.volume("vm1").get_snapshot("s3").read(0, 1 * M)
        clone.write(0, b"clone")
        assert pool.volume("vm1").read(0, 5) == first[:5]
    assert js(cpool, "pool", "status")["used"] == used_before + bs  # shares all but one block

    # rollback: the live volume is s1 again; newer snapshots stay
    assert ok(cpool, "snapshot", "rollback", "vm1@s1").strip() == "rolled back to vm1@s1"
    assert js(cpool, "snapshot", "diff", "vm1@s1")["extents"] == []
    with blocksnap.Pool.open(str(cpool)) as pool:
        assert pool.volume("vm1").read(0, 4 * M) == first + bytes(3 * M)
        assert [s.name for s in pool.volume("vm1").snapshots()] == ["s1", "s2", "s3"]

    assert ok(cpool, "snapshot", "delete", "vm1@s2").strip() == "deleted snapshot vm1@s2"
    assert [s["name"] for s in js(cpool, "snapshot", "list", "vm1")] == ["s1", "s3"]
    assert js(cpool, "pool", "status")["snapshots"] == 3
    assert ok(cpool, "check").strip() == "clean"


def test_cow_volume(cpool, tmp_path):
    bs = 64 * K
    img = tmp_path / "vm.img"
    original = rand(2 * M, 20)
    img.write_bytes(original)
    info = js(cpool, "volume", "create", "vm", "--mode", "cow", "--origin", img, "--block-size", "64K")
    assert info["mode"] == "cow" and info["origin"] == str(img) and info["size"] == 2 * M
    ok(cpool, "snapshot", "create", "vm@before")
    with blocksnap.Pool.open(str(cpool)) as pool:
        pool.volume("vm").write(5 * bs + 7, b"changed in place")
    with open(img, "rb") as f:  # written in place in the origin
        assert f.read()[5 * bs + 7:5 * bs + 23] == b"changed in place"
    assert js(cpool, "pool", "status")["used"] == bs  # the one copied block
    assert js(cpool, "snapshot", "diff", "vm@before")["extents"] == [{"offset": 5 * bs, "length": bs}]
    out = tmp_path / "before.img"
    ok(cpool, "export", "vm@before", out)
    assert out.read_bytes() == original
    ok(cpool, "snapshot", "clone", "vm@before", "vm-copy")
    with blocksnap.Pool.open(str(cpool)) as pool:
        assert pool.volume("vm-copy").read(0, 2 * M) == original
    ok(cpool, "snapshot", "rollback", "vm@before")
    assert img.read_bytes() == original
    ok(cpool, "volume", "delete", "--recursive", "vm")
    assert img.read_bytes() == original  # the origin is left alone
    assert ok(cpool, "check").strip() == "clean"


def test_check_and_scrub(cpool):
    ok(cpool, "volume", "create", "v", "--size", "2M", "--block-size", "4K")
    with blocksnap.Pool.open(str(cpool)) as pool:
        pool.volume("v").write(0, rand(40 * K, 5))
    ok(cpool, "snapshot", "create", "v@s")
    assert ok(cpool, "check").strip() == "clean"
    rep = js(cpool, "check")
    assert rep["clean"] is True and rep["errors"] == [] and rep["volumes"] == 1 and rep["snapshots"] == 1
    assert ok(cpool, "scrub", "v").strip() == "scrubbed 10 block(s): clean"
    rep = js(cpool, "scrub", "v@s")
    assert rep["clean"] is True and rep["checked_blocks"] == 10 and rep["bad"] == []


# -- output ----------------------------------------------------------------------------------

def _run_with_tty_stderr(pool, *args) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal (stdout piped): (code, stdout, terminal output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--pool", str(pool), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    tty = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            tty += chunk
        out = proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, tty


def test_piped_and_quiet_output_has_no_progress_bar(cpool, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(rand(24 * M, 9))
    # piped: no progress bar anywhere, just the result
    for args in (["volume", "import", "img", src], ["snapshot", "create", "img@s"],
                 ["export", "img@s", tmp_path / "a.img"], ["snapshot", "clone", "img@s", "c"],
                 ["scrub", "img"]):
        res = run_cli(cpool, *args)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert "\x1b" not in res.stdout and "\u2501" not in res.stdout and "\r" not in res.stdout
        assert len(res.stdout.splitlines()) == 1
    # -q: nothing at all for commands that only report success
    for args in (["export", "img@s", tmp_path / "b.img"], ["snapshot", "create", "img@s2"],
                 ["snapshot", "delete", "img@s2"], ["volume", "create", "q", "--size", "1M"]):
        res = run_cli(cpool, "-q", *args)
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", (args, res)
    # -q with --json still prints the JSON
    res = run_cli(cpool, "-q", "volume", "show", "q", "--json")
    assert json.loads(res.stdout)["name"] == "q"

    # on a terminal the bar is drawn on stderr (stdout keeps only the result) ...
    code, out, tty = _run_with_tty_stderr(cpool, "export", "img@s", tmp_path / "c.img")
    assert code == 0
    assert out.decode().startswith("exported img@s") and b"\x1b" not in out
    assert b"export img@s" in tty
    # ... and -q turns it off there too
    code, out, tty = _run_with_tty_stderr(cpool, "-q", "export", "img@s", tmp_path / "d.img")
    assert code == 0 and out == b"" and tty == b""
    assert filecmp.cmp(src, tmp_path / "d.img", shallow=False)


def test_version_and_help(tmp_path):
    res = run_cli(None, "--version")
    assert res.returncode == 0 and blocksnap.__version__ in res.stdout
    res = run_cli(None, "--help")
    assert res.returncode == 0
    for cmd in ("pool", "volume", "snapshot", "export", "check", "scrub"):
        assert cmd in res.stdout
    res = run_cli(tmp_path / "none", "snapshot", "--help")
    assert res.returncode == 0 and "rollback" in res.stdout and "clone" in res.stdout


def test_the_lazy_command_map_names_every_command_where_it_is_defined():
    """cli.main imports a command's module when the command is used: its map must
    name each command of every module's COMMANDS, by the module that registers it
    (the last one, for mount and umount, which recovery_cmd takes over)."""
    import importlib
    import pkgutil

    import blocksnap.cli as pkg
    from blocksnap.cli.main import COMMAND_MODULES, cli

    defined: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"blocksnap.cli.{info.name}")
        for command in getattr(mod, "COMMANDS", []):
            if command.name not in defined or info.name == "recovery_cmd":
                defined[command.name] = info.name
    assert COMMAND_MODULES == defined
    for name, module in COMMAND_MODULES.items():
        got = cli.get_command(None, name)
        assert got in importlib.import_module(f"blocksnap.cli.{module}").COMMANDS


def test_a_command_imports_only_its_own_module(tmp_path):
    """`snapshot --help` does not import the recovery, policy or backup commands."""
    code = ("import sys, blocksnap.cli.main as m\n"
            "try:\n    m.cli.main(['--pool', sys.argv[1], 'snapshot', '--help'], standalone_mode=False)\n"
            "finally:\n    print(sorted(n for n in sys.modules if n.startswith('blocksnap.cli.')))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    loaded = out.stdout.strip().splitlines()[-1]
    assert "snapshot_cmd" in loaded
    for other in ("recovery_cmd", "ops_cmd", "backup_cmd", "freeze_cmd"):
        assert other not in loaded
