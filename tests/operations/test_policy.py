"""Policy files: the design's example loads; each kind of mistake is refused with file:line."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from blocksnap.errors import InvalidArgument
from blocksnap.operations.policy import PolicyError, load
from tests.conftest import assert_cli_error, run_cli

GOOD = """\
timezone = "Europe/Berlin"

[[repository]]
name = "local"
url = "file://{tmp}/repo"
password_file = "{tmp}/local.pass"
medium = "disk"
offsite = false

[[repository]]
name = "cloud"
url = "s3://backups/blocksnap"
endpoint = "https://s3.example.com"
password_file = "{tmp}/cloud.pass"
medium = "object"
offsite = true

[[volume]]
match = ["vm*", "db"]
rpo = "1h"
snapshot = {{ every = "15m", freeze = ["/mnt/db"], pg = ["host=/run/postgresql dbname=app"] }}
keep_snapshots = {{ last = 4, hourly = 24, daily = 7 }}
backup = {{ to = ["local"], every = "1h", full = ["sun"], window = "22:00-06:00",
           except = ["2026-12-24/2026-12-26", "01:00-01:30"] }}
keep_backups = {{ daily = 7, weekly = 4, monthly = 12, yearly = 7 }}
copy = [{{ from = "local", to = "cloud", every = "1d" }}]
verify = {{ cycle = "30d", budget = "20G" }}
drill = {{ every = "7d", check = ["fsck"] }}

[alerts]
webhook = ["http://127.0.0.1:9099/hook"]
email = {{ to = ["ops@example.com"], smtp = "127.0.0.1:25" }}
command = "/usr/local/bin/page-me"
storage_threshold = 0.9
remind = "4h"

[metrics]
listen = "127.0.0.1:9469"
textfile = "{tmp}/blocksnap.prom"
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    for name in ("local.pass", "cloud.pass"):
        (tmp_path / name).write_text("secret\n")
    p = tmp_path / "policy.toml"
    p.write_text(GOOD.format(tmp=tmp_path))
    return p


def test_design_example_loads(good: Path):
    p = load(str(good))
    assert set(p.repositories) == {"local", "cloud"}
    assert p.repositories["cloud"].offsite and p.repositories["cloud"].medium == "object"
    rule = p.rule_for("vm7")
    assert rule is p.rule_for("db") and p.rule_for("web") is None
    assert rule.rpo == 3600 and rule.snapshot.schedule.every == 900
    assert rule.backup.full == [6] and rule.backup.window.ranges[0].start == 22 * 60
    assert rule.backup.window.except_dates[0].first == "2026-12-24"
    assert rule.backup.window.except_times[0].end == 90
    assert rule.keep_backups.yearly == 7 and rule.verify.budget == 20 << 30
    assert rule.copy[0].source == "local" and rule.copy[0].dest == "cloud"
    assert p.alerts.remind == 4 * 3600 and p.alerts.email.to == ["ops@example.com"]


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


BAD = [
    # (replace this, with this, the line to blame (a string on it), what the message says)
    ('rpo = "1h"', 'rpo = "1h"\ncolour = "blue"', 'colour = "blue"', "unknown key 'colour'"),
    ('remind = "4h"', 'remnd = "4h"', 'remnd', "did you mean 'remind'"),
    ('every = "15m", freeze', 'every = "15 minutes", freeze', 'every = "15 minutes"', "invalid duration"),
    ('window = "22:00-06:00"', 'window = "22:00-26:00"', "22:00-26:00", "invalid time of day"),
    ('full = ["sun"]', 'full = ["sunday", "funday"]', "funday", "invalid weekday"),
    ('"2026-12-24/2026-12-26"', '"2026-12-26/2026-12-24"', "2026-12-26/2026-12-24", "ends before it starts"),
    ('window = "22:00-06:00"', 'window = "01:00-01:20"', "01:00-01:20", "never open"),
    ('to = "cloud", every = "1d"', 'to = "tape", every = "1d"', 'to = "tape"', "unknown repository 'tape'"),
    ('to = ["local"]', 'to = ["locl"]', 'to = ["locl"]', "unknown repository 'locl'"),
    ('password_file = "{tmp}/cloud.pass"', 'password_file = "{tmp}/missing.pass"', "missing.pass",
     "No such file or directory"),
    ('snapshot = { every = "15m"', 'snapshot = { every = "2h"', 'rpo = "1h"', "cannot be met"),
    ('timezone = "Europe/Berlin"', 'timezone = "Mars/Olympus"', "Mars/Olympus", "unknown time zone"),
    ('storage_threshold = 0.9', 'storage_threshold = 90', "storage_threshold = 90", "between 0 and 1"),
    ('listen = "127.0.0.1:9469"', 'listen = "everywhere"', 'listen = "everywhere"', "HOST:PORT"),
    ('medium = "object"', 'medium = "floppy"', 'medium = "floppy"', "medium 'floppy'"),
    ('keep_backups = { daily = 7', 'keep_backups = { daily = "seven"', 'keep_backups', "whole number"),
    ('check = ["fsck"]', 'check = ["boot"]', 'check = ["boot"]', "check 'boot'"),
    ('[metrics]', '[metrics\n', '[metrics', ""),   # TOML syntax
]


@pytest.mark.parametrize("old,new,blame,says", BAD, ids=[b[3] or "toml syntax" for b in BAD])
def test_bad_policy_names_file_and_line(good: Path, tmp_path: Path, old: str, new: str, blame: str, says: str):
    text = good.read_text()
    old, new = old.replace("{tmp}", str(tmp_path)), new.replace("{tmp}", str(tmp_path))
    assert old in text, old
    text = text.replace(old, new, 1)
    good.write_text(text)
    with pytest.raises(PolicyError) as e:
        load(str(good))
    first = e.value.problems[0]
    line = _line_of(text, blame)
    assert first.startswith(f"{good}:{line}: "), (first, line)
    assert says in first


def test_every_problem_reported_at_once(good: Path):
    good.write_text(good.read_text().replace('rpo = "1h"', 'rpo = "soon"\nfoo = 1'))
    with pytest.raises(PolicyError) as e:
        load(str(good))
    assert len(e.value.problems) == 2


def test_missing_file(tmp_path: Path):
    with pytest.raises(InvalidArgument, match="No such file"):
        load(str(tmp_path / "nope.toml"))


def test_policy_check_cli(good: Path, tmp_path: Path):
    res = run_cli(None, "policy", "check", str(good))
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout
    good.write_text(good.read_text().replace('rpo = "1h"', 'rpo = "1h"\nrpoo = 1\nsnap = 2'))
    res = run_cli(None, "policy", "check", str(good))
    msg = assert_cli_error(res, InvalidArgument.exit_code, f"{good}:")
    assert "rpoo" in msg and "Traceback" not in res.stderr
    assert "also:" in res.stdout and "snap" in res.stdout


def test_minimal_policy(tmp_path: Path):
    (tmp_path / "pw").write_text("x")
    p = tmp_path / "p.toml"
    p.write_text(textwrap.dedent(f"""
        [[repository]]
        name = "r"
        url = "file://{tmp_path}/r"
        password_file = "{tmp_path}/pw"
        [[volume]]
        match = ["*"]
        backup = {{ to = ["r"] }}
    """))
    rule = load(str(p)).rule_for("anything")
    assert rule.backup.schedule.every == 86400 and rule.backup.window.always()
