"""settings.py: every environment variable read in one place, parsed once, a bad
value named in the error, and docs/usage.md's table listing exactly those variables."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from blocksnap import settings
from blocksnap.errors import InvalidArgument
from blocksnap.settings import Settings
from tests.conftest import assert_cli_error, run_cli

USAGE = Path(__file__).resolve().parents[2] / "docs" / "usage.md"


def test_defaults_when_nothing_is_set():
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.pool, s.daemon_timeout, s.loop_direct_io, s.write_behind, s.pure_python) == \
        ("/var/lib/blocksnap", 60.0, True, True, False)
    assert s.repo_password is s.runtime_dir is s.xdg_runtime_dir is s.mysql_pwd is None


@pytest.mark.parametrize("value, expect", [
    ("on", True), ("ON", True), ("1", True), ("yes", True), ("true", True), (" on ", True),
    ("off", False), ("Off", False), ("0", False), ("no", False), ("false", False),
])
def test_one_on_off_parser_for_every_switch(value, expect):
    for name, field in [(settings.WRITE_BEHIND_ENV, "write_behind"), (settings.LOOP_DIRECT_IO_ENV, "loop_direct_io"),
                        (settings.PURE_PYTHON_ENV, "pure_python")]:
        assert getattr(Settings.from_env({name: value}), field) is expect
        assert getattr(Settings.from_env({name: ""}), field) is getattr(Settings(), field)   # empty: default


@pytest.mark.parametrize("name, value", [
    (settings.WRITE_BEHIND_ENV, "maybe"), (settings.LOOP_DIRECT_IO_ENV, "2"), (settings.PURE_PYTHON_ENV, "y"),
    (settings.DAEMON_TIMEOUT_ENV, "soon"), (settings.DAEMON_TIMEOUT_ENV, "0"), (settings.DAEMON_TIMEOUT_ENV, "-1"),
    (settings.DAEMON_TIMEOUT_ENV, "inf"), (settings.DAEMON_TIMEOUT_ENV, "nan"),
])
def test_a_bad_value_names_the_variable(name, value):
    with pytest.raises(InvalidArgument, match=f"^{name}='{re.escape(value)}': expected"):
        Settings.from_env({name: value})


def test_values_are_taken_as_given():
    s = Settings.from_env({"BLOCKSNAP_POOL": "/p", "BLOCKSNAP_DAEMON_TIMEOUT": "2.5",
                           "BLOCKSNAP_RUNTIME_DIR": "/r", "XDG_RUNTIME_DIR": "/x", "MYSQL_PWD": "",
                           "BLOCKSNAP_REPO_PASSWORD": "secret"})
    assert (s.pool, s.daemon_timeout, s.runtime_dir, s.xdg_runtime_dir) == ("/p", 2.5, "/r", "/x")
    assert s.mysql_pwd == ""            # an empty MySQL password is a password
    assert s.repo_password == "secret" and "secret" not in repr(s)
    with pytest.raises(AttributeError):
        s.pool = "/q"                    # frozen


def test_the_usage_table_lists_exactly_the_variables_settings_reads():
    text = USAGE.read_text()
    table = text.split("## Environment", 1)[1].split("\n\n| variable |", 1)[1].split("\n\n", 1)[0]
    names = [n for line in table.splitlines()[2:] for n in re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1])]
    assert tuple(names) == settings.VARIABLES
    assert "settings.py" in text.split("## Environment", 1)[1]


def test_the_command_line_reports_a_bad_variable(tmp_path):
    res = run_cli(tmp_path / "pool", "pool", "status", env={"BLOCKSNAP_WRITE_BEHIND": "maybe"})
    assert_cli_error(res, 1, "BLOCKSNAP_WRITE_BEHIND='maybe'", "expected on or off")


def test_pure_python_is_a_filestore_argument(tmp_path):
    from blocksnap.store import FileStore
    path = tmp_path / "data"
    path.write_bytes(bytes(4096))
    pure = FileStore(str(path), writable=False, pure_python=True)
    compiled = FileStore(str(path), writable=False, pure_python=False)
    try:
        assert pure.read_mapped is None
        assert compiled.read_mapped is FileStore.read_mapped or compiled.read_mapped.__func__ is FileStore.read_mapped
    finally:
        pure.close()
        compiled.close()
