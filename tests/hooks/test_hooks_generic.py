"""Generic pre/post/abort hooks, the plan, the record, DSN parsing and redaction.
No root needed: these run real hook commands but freeze nothing."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from blocksnap.errors import BlocksnapError, InvalidArgument
from blocksnap.hooks import FreezePlan, HookError, parse_mysql, parse_pg, run_frozen

from .conftest import assert_one_error_line, run_freeze

ENV_DUMP = (
    f"{sys.executable} -c \"import os,sys,json; "
    "open(sys.argv[1],'a').write(json.dumps({k:v for k,v in os.environ.items() "
    "if k.startswith('BLOCKSNAP_')})+'\\n')\" "
)


def dump_hook(path: Path, tag: str | None = None) -> str:
    """A hook command that appends its BLOCKSNAP_* environment (and a tag) to `path`."""
    cmd = ENV_DUMP + str(path)
    if tag:
        cmd = (f"{sys.executable} -c \"import os,sys,json; "
               "open(sys.argv[1],'a').write(json.dumps(dict({k:v for k,v in os.environ.items() "
               "if k.startswith('BLOCKSNAP_')}, tag=sys.argv[2]))+'\\n')\" "
               f"{path} {tag}")
    return cmd


def read_dumps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_hook_error_is_a_blocksnap_error():
    assert issubclass(HookError, BlocksnapError)


@pytest.mark.parametrize("kw", [{"timeout": 61}, {"timeout": 0}, {"timeout": -1}, {"timeout": "x"},
                                {"pg_mode": "exclusive"}, {"fs": [""]}])
def test_plan_validation(kw):
    with pytest.raises(InvalidArgument):
        FreezePlan(**kw)


def test_plan_defaults():
    p = FreezePlan()
    assert p.timeout == 10.0 and p.pg_mode == "default" and not p.shell
    assert FreezePlan(timeout=60).timeout == 60.0


def test_no_hooks_record_is_crash_and_json(tmp_path):
    rec = run_frozen(FreezePlan(volume="vm1", snapshot="s1"), lambda: {"id": 7})
    json.dumps(rec)
    assert rec["consistency"] == "crash"  # nothing quiesced
    assert rec["result"] == {"id": 7}
    assert rec["errors"] == [] and rec["hooks"] == [] and rec["aborted"] is False
    assert rec["volume"] == "vm1" and rec["snapshot"] == "s1"
    assert rec["freeze_ms"] == 0.0 and rec["total_ms"] >= 0


def test_env_and_order(tmp_path):
    log = tmp_path / "log"
    plan = FreezePlan(pre=[dump_hook(log, "pre1"), dump_hook(log, "pre2")],
                      post=[dump_hook(log, "post1"), dump_hook(log, "post2")],
                      volume="vm1", snapshot="s1", timeout=5)
    seen = []
    t0 = time.time()
    rec = run_frozen(plan, lambda: seen.append("action") or "ok")
    dumps = read_dumps(log)
    assert [d["tag"] for d in dumps] == ["pre1", "pre2", "post2", "post1"]  # post: reverse order
    assert seen == ["action"]
    pre, post = dumps[0], dumps[-1]
    assert pre["BLOCKSNAP_PHASE"] == "pre" and post["BLOCKSNAP_PHASE"] == "post"
    assert pre["BLOCKSNAP_VOLUME"] == "vm1" and pre["BLOCKSNAP_SNAPSHOT"] == "s1"
    assert pre["BLOCKSNAP_MOUNTPOINTS"] == ""
    assert t0 < float(pre["BLOCKSNAP_DEADLINE"]) <= time.time() + 5.5
    assert "BLOCKSNAP_RESULT" not in pre
    assert post["BLOCKSNAP_RESULT"] == "ok" and post["BLOCKSNAP_CONSISTENCY"] == "crash"
    kinds = [(h["kind"], h["phase"], h["status"]) for h in rec["hooks"]]
    assert kinds == [("pre", "pre", "ok")] * 2 + [("post", "post", "ok")] * 2
    assert rec["result"] == "ok"


def test_pre_hook_failure_aborts(tmp_path):
    log = tmp_path / "log"
    ran = []
    plan = FreezePlan(pre=[dump_hook(log, "pre1"), "sh -c 'echo boom >&2; exit 3'", dump_hook(log, "never")],
                      post=[dump_hook(log, "post1"), dump_hook(log, "post2")])
    with pytest.raises(HookError) as ei:
        run_frozen(plan, lambda: ran.append(1))
    assert ran == []  # the action did not run
    msg = str(ei.value)
    assert "\n" not in msg and "pre hook" in msg and "exit status 3" in msg and "boom" in msg
    dumps = read_dumps(log)
    assert [d["tag"] for d in dumps] == ["pre1", "post2", "post1"]  # abort hooks, reverse order
    assert all(d["BLOCKSNAP_PHASE"] == "abort" and d["BLOCKSNAP_RESULT"] == "failed" for d in dumps[1:])
    rec = ei.value.record
    json.dumps(rec)
    assert rec["aborted"] is True and rec["result"] is None
    assert [h["phase"] for h in rec["hooks"]] == ["pre", "pre", "abort", "abort"]


def test_post_hook_failure_is_reported_and_result_kept(tmp_path):
    log = tmp_path / "log"
    plan = FreezePlan(post=[dump_hook(log, "ok"), "sh -c 'echo nope; exit 2'"])
    rec = run_frozen(plan, lambda: "snapshot-id")
    assert rec["result"] == "snapshot-id"
    assert len(rec["errors"]) == 1 and "post hook" in rec["errors"][0] and "nope" in rec["errors"][0]
    assert [d["tag"] for d in read_dumps(log)] == ["ok"]  # still ran (after the failing one)
    failed = [h for h in rec["hooks"] if h["status"] != "ok"]
    assert failed[0]["exit_code"] == 2 and "nope" in failed[0]["output"]


def test_hook_timeout_kills_it(tmp_path):
    ran = []
    plan = FreezePlan(pre=["sleep 30"], timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(HookError) as ei:
        run_frozen(plan, lambda: ran.append(1))
    assert time.monotonic() - t0 < 5
    assert "timed out" in str(ei.value) and ran == []
    assert ei.value.record["hooks"][0]["status"] == "timeout"


def test_hook_timeout_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "late"
    plan = FreezePlan(pre=[f"(sleep 1.5; touch {marker}) & wait"], timeout=0.5, shell=True)
    with pytest.raises(HookError):
        run_frozen(plan, lambda: None)
    time.sleep(2)
    assert not marker.exists()  # the grandchild was killed with the hook


def test_shell_false_does_not_interpret(tmp_path):
    out = tmp_path / "x"
    rec = run_frozen(FreezePlan(post=[f"sh -c 'echo $0' {out}"]), lambda: None)
    assert rec["errors"] == []
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(pre=["false; true"]), lambda: None)
    assert "cannot run" in str(ei.value)
    run_frozen(FreezePlan(pre=["false; true"], shell=True), lambda: None)  # a shell: exit 0


def test_missing_hook_program(tmp_path):
    with pytest.raises(HookError) as ei:
        run_frozen(FreezePlan(pre=["/nonexistent/hook"]), lambda: None)
    assert "cannot run /nonexistent/hook" in str(ei.value)


def test_action_exception_propagates_after_abort_hooks(tmp_path):
    log = tmp_path / "log"

    def boom():
        raise RuntimeError("engine failed")

    with pytest.raises(RuntimeError) as ei:
        run_frozen(FreezePlan(pre=[dump_hook(log, "pre")], post=[dump_hook(log, "post")]), boom)
    assert [(d["tag"], d["BLOCKSNAP_PHASE"]) for d in read_dumps(log)] == [("pre", "pre"), ("post", "abort")]
    assert ei.value.record["aborted"] is True


def test_post_result_failed_when_action_unsuccessful(tmp_path):
    log = tmp_path / "log"
    run_frozen(FreezePlan(post=[dump_hook(log)]), lambda: 3, succeeded=lambda r: r == 0)
    assert read_dumps(log)[0]["BLOCKSNAP_RESULT"] == "failed"


# ------------------------------------------------------------------ DSNs

def test_pg_dsn_redaction():
    t = parse_pg("postgresql://backup:s3cr%40t@db.example:5433/app?sslmode=require")
    assert "s3cr" not in t.redacted and "password" not in t.redacted
    assert "user=backup" in t.redacted and "dbname=app" in t.redacted and "port=5433" in t.redacted
    assert t.secrets == ["s3cr@t"]
    t = parse_pg("host=/run/postgresql dbname=app password='a b c'")
    assert "a b c" not in t.redacted
    assert sorted(t.redacted.split()) == ["dbname=app", "host=/run/postgresql"]


def test_bad_pg_dsn_does_not_echo_it():
    with pytest.raises(HookError) as ei:
        parse_pg("host=/x password='unterminated-secret")
    assert "unterminated-secret" not in str(ei.value)


def test_mysql_url_parsing(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MYSQL_PWD", raising=False)
    t = parse_mysql("mysql://bk:p%40ss@db.example:3307/app")
    assert (t.user, t.password, t.host, t.port, t.database, t.unix_socket) == \
        ("bk", "p@ss", "db.example", 3307, "app", None)
    assert "p@ss" not in t.redacted and "p%40ss" not in t.redacted
    assert t.redacted == "mysql://bk@db.example:3307/app"
    t = parse_mysql("mysql://root@localhost/?unix_socket=/tmp/m.sock")
    assert t.unix_socket == "/tmp/m.sock" and t.password is None
    assert t.redacted == "mysql://root@localhost/?unix_socket=/tmp/m.sock"
    monkeypatch.setenv("MYSQL_PWD", "from-env")
    assert parse_mysql("mysql://root@localhost/?unix_socket=/s").password == "from-env"
    monkeypatch.delenv("MYSQL_PWD")
    (tmp_path / ".my.cnf").write_text("!includedir /etc/mysql/conf.d/\n[mysqld]\npassword=no\n"
                                      "[client]\nuser = cnfuser\npassword = \"from cnf\"\nskip-ssl\n")
    t = parse_mysql("mysql:///?unix_socket=/s")
    assert (t.user, t.password, t.password_source) == ("cnfuser", "from cnf", "~/.my.cnf")
    for bad in ("postgres://x@y/", "mysql://x@y:notaport/"):
        with pytest.raises(HookError):
            parse_mysql(bad)


# ------------------------------------------------------------------ command line

def test_cli_runs_command_and_exits_with_its_status(tmp_path):
    res = run_freeze("--json", "--", "sh", "-c", "exit 7")
    assert res.returncode == 7, res.stderr
    rec = json.loads(res.stdout)
    assert rec["result"]["exit_code"] == 7 and rec["consistency"] == "crash"


def test_cli_summary_on_stderr(tmp_path):
    res = run_freeze("--", "true")
    assert res.returncode == 0 and res.stdout == ""
    assert res.stderr.startswith("freeze: consistency crash")


def test_cli_command_not_found():
    assert_one_error_line(run_freeze("--", "no-such-command-xyz"), "command not found")


def test_cli_pre_hook_failure_is_one_error_line(tmp_path):
    marker = tmp_path / "ran"
    res = run_freeze("--pre", "false", "--", "touch", str(marker))
    assert_one_error_line(res, "pre hook", "aborted")
    assert not marker.exists()


def test_cli_timeout_bounds():
    res = run_freeze("--timeout", "61", "--", "true")
    assert res.returncode == 2 and res.stderr.startswith("error:")


def test_cli_command_options_are_not_ours(tmp_path):
    # everything after COMMAND belongs to COMMAND, even without "--"
    res = run_freeze("sh", "-c", "exit 5")
    assert res.returncode == 5, res.stderr


def test_cli_with_click_runner(tmp_path):
    from blocksnap.cli.freeze_cmd import COMMANDS, freeze

    assert COMMANDS == [freeze]
    res = CliRunner().invoke(freeze, ["--json", "--", "sh", "-c", "exit 4"])
    assert res.exit_code == 4, res.output
    res = CliRunner().invoke(freeze, ["--pre", "false", "--", "true"])
    assert isinstance(res.exception, HookError)


def test_cli_command_killed_at_deadline(tmp_path):
    t0 = time.monotonic()
    res = run_freeze("--timeout", "1", "--json", "--", "sleep", "30")
    assert time.monotonic() - t0 < 10
    assert res.returncode == 124
    rec = json.loads(res.stdout)
    assert rec["result"]["timed_out"] is True and rec["consistency"] == "crash"
    assert any("timeout" in e for e in rec["errors"])


def test_recover_with_no_state_is_noop():
    from blocksnap.hooks import recover_stale_freezes

    assert recover_stale_freezes() == []


def test_no_password_in_subprocess_env_dump(tmp_path):
    """The DSN given on the command line never reaches hooks' BLOCKSNAP_* variables."""
    log = tmp_path / "log"
    res = run_freeze("--mysql", "mysql://u:TopSecretPw@127.0.0.1:1/", "--pre", dump_hook(log),
                     "--post", dump_hook(log), "--timeout", "3", "--", "true")
    assert res.returncode == 1 and "TopSecretPw" not in res.stderr + res.stdout
    assert "TopSecretPw" not in log.read_text()
    assert os.environ.get("BLOCKSNAP_PHASE") is None


def test_watchdog_constants_match():
    from blocksnap.hooks import ioctls, watchdog

    assert (watchdog.FIFREEZE, watchdog.FITHAW) == (ioctls.FIFREEZE, ioctls.FITHAW)


def test_watchdog_exits_quietly_on_done_and_acts_on_eof(tmp_path):
    """The watchdog protocol, on a directory that is not frozen (no root needed)."""
    import subprocess

    script = [sys.executable, "-I", "-B", "-m", "blocksnap.hooks.watchdog"]
    dl = str(time.time() + 30)
    p = subprocess.run([*script, "--deadline", dl, str(tmp_path)], input=b"done\n",
                       capture_output=True, timeout=10)
    assert p.returncode == 0 and p.stdout.decode().split() == ["ready"]
    p = subprocess.run([*script, "--deadline", dl, str(tmp_path)], input=b"",
                       capture_output=True, timeout=10)  # EOF = the parent is gone
    out = p.stdout.decode().splitlines()
    assert out[0] == "ready" and out[1].startswith("not-frozen ")  # thawed (nothing to thaw)
    t0 = time.monotonic()
    p = subprocess.Popen([*script, "--deadline", str(time.time() + 0.5), str(tmp_path)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = p.stdout.read().decode().splitlines()  # until it exits; stdin stays open
    p.wait(5)
    p.stdin.close()
    assert time.monotonic() - t0 < 5 and out[1].endswith(" deadline"), out
