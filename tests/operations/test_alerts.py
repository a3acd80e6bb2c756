"""The agent's alerts: conditions from Reports, the once / remind / resolve cycle on a
simulated clock, restarts and crashes against the state file, and every channel
delivering to a real receiver (HTTP server, aiosmtpd, a command)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from blocksnap.operations.alerts import AlertManager, Condition, conditions
from blocksnap.operations.channels import ping, ping_url
from blocksnap.operations.model import AlertsConfig, EmailConfig, WebhookTarget

from .conftest import NOW, HttpReceiver, breach_rpo, fail_backup, free_port, healthy_report, job, vol, wait_for

REMIND = 4 * 3600.0


def cond(key: str = "rpo_breached/vm1", severity: str = "critical") -> Condition:
    return Condition(key, severity, f"summary of {key}", f"description of {key}", {"volume": "vm1"})


def hook_config(receiver: HttpReceiver, fmt: str = "json", **kw) -> AlertsConfig:
    return AlertsConfig(webhooks=[WebhookTarget(receiver.url(), fmt)], remind=REMIND, **kw)


def statuses(receiver: HttpReceiver) -> list[tuple[str, str, bool]]:
    return [(b["status"], b["key"], b["reminder"]) for b in (r.json() for r in receiver.requests)]


# -- conditions ------------------------------------------------------------------------

def test_a_healthy_report_holds_no_condition():
    assert conditions(healthy_report(), AlertsConfig(), NOW) == {}


def test_every_condition_has_its_key():
    r = healthy_report()
    fail_backup(r, "vm1")
    breach_rpo(r, "db")
    job(r, "db", "snapshot").last_result = "interrupted"
    vol(r, "vm1").next_runs["snapshot"] = NOW - 31 * 60          # 31 minutes past due
    vol(r, "db").drill.ok = False
    vol(r, "db").drill.error = "fsck: bad superblock"
    r.pool.used_ratio = 0.93
    local, cloud = r.repositories
    cloud.used_ratio = 0.95
    cloud.corruption = ["pack 1f: chunk 9c checksum mismatch"]
    local.reachable, local.error = False, "No such file or directory"
    r.policy_error = "/etc/blocksnap/policy.toml:12: unknown key 'evry'"
    found = conditions(r, AlertsConfig(), NOW)
    assert set(found) == {
        "job_failed/vm1/backup/local", "job_failed/db/snapshot", "rpo_breached/db", "job_late/vm1/snapshot",
        "drill_failed/db", "storage/pool", "storage/repository/cloud", "corruption/cloud",
        "repository_unreachable/local", "policy_refused"}
    assert found["job_failed/vm1/backup/local"].severity == "critical"
    assert "disk full" in found["job_failed/vm1/backup/local"].description
    assert found["job_failed/db/snapshot"].summary == "snapshot of db interrupted"
    assert found["rpo_breached/db"].description == "db: newest restorable copy is 3h old (RPO 1h)."
    assert "bad superblock" in found["drill_failed/db"].description
    assert "evry" in found["policy_refused"].description
    assert found["storage/repository/cloud"].labels == {"repository": "cloud"}


def test_storage_threshold_and_late_come_from_the_config():
    r = healthy_report()
    r.pool.used_ratio = 0.85
    vol(r, "vm1").next_runs["backup:local"] = NOW - 20 * 60
    assert conditions(r, AlertsConfig(), NOW) == {}
    found = conditions(r, AlertsConfig(storage_threshold=0.8, late=600), NOW)
    assert set(found) == {"storage/pool", "job_late/vm1/backup/local"}


def test_a_running_job_is_not_late_and_its_volume_waits():
    r = healthy_report()
    v = vol(r, "vm1")
    v.next_runs["snapshot"] = NOW - 3600
    job(r, "vm1", "backup").last_result = "running"       # one job per volume at a time
    assert conditions(r, AlertsConfig(), NOW) == {}


def test_a_failed_job_stays_failed_through_its_retry_until_a_success():
    r = healthy_report()
    j = fail_backup(r, "vm1")
    key = "job_failed/vm1/backup/local"
    assert key in conditions(r, AlertsConfig(), NOW)
    j.last_result = "running"
    assert key not in conditions(r, AlertsConfig(), NOW)               # not firing before: nothing to keep
    assert key in conditions(r, AlertsConfig(), NOW, previous={key})   # firing: a retry does not clear it
    j.last_result = "stopped"                                          # window closed mid-run
    assert key in conditions(r, AlertsConfig(), NOW, previous={key})
    j.last_result = "ok"
    assert key not in conditions(r, AlertsConfig(), NOW, previous={key})


# -- the alert cycle ------------------------------------------------------------------------

def test_alert_once_remind_resolve_once(receiver, tmp_path):
    mgr = AlertManager(hook_config(receiver), str(tmp_path / "alerts.json"), "host1")
    c = cond()
    t = NOW
    assert [n.status for n in mgr.run({c.key: c}, t)] == ["firing"]
    for dt in (5, 60, 3600, REMIND - 1):                        # the agent's ticks: no storm
        assert mgr.run({c.key: c}, t + dt) == []
    made = mgr.run({c.key: c}, t + REMIND)
    assert [(n.status, n.reminder) for n in made] == [("firing", True)]
    assert mgr.run({c.key: c}, t + REMIND + 5) == []
    assert mgr.run({c.key: c}, t + 2 * REMIND)[0].reminder
    resolved = mgr.run({}, t + 2 * REMIND + 30)
    assert [n.status for n in resolved] == ["resolved"]
    assert resolved[0].started == t
    assert mgr.run({}, t + 3 * REMIND) == []
    assert statuses(receiver) == [("firing", c.key, False), ("firing", c.key, True), ("firing", c.key, True),
                                  ("resolved", c.key, False)]
    body = receiver.requests[-1].json()
    assert body["started"] == "2027-01-15T08:00:00Z"
    assert body["host"] == "host1" and body["alertname"] == "BlocksnapRPOBreached"


def test_a_restart_neither_refires_nor_loses_the_resolve(receiver, tmp_path):
    state = str(tmp_path / "alerts.json")
    a, b = cond("rpo_breached/vm1"), cond("storage/pool", "warning")
    AlertManager(hook_config(receiver), state, "host1").run({a.key: a, b.key: b}, NOW)
    assert len(receiver.requests) == 2
    # restarted agent, both still hold: nothing new, and the reminder clock is kept
    again = AlertManager(hook_config(receiver), state, "host1")
    assert again.run({a.key: a, b.key: b}, NOW + 60) == []
    assert again.active_keys() == {a.key, b.key}
    # b cleared while the agent was down: the next agent resolves it, once
    third = AlertManager(hook_config(receiver), state, "host1")
    assert [(n.status, n.condition.key) for n in third.run({a.key: a}, NOW + 120)] == [("resolved", b.key)]
    assert AlertManager(hook_config(receiver), state, "host1").run({a.key: a}, NOW + 180) == []
    assert AlertManager(hook_config(receiver), state, "host1").run({a.key: a}, NOW + REMIND)[0].reminder
    assert statuses(receiver) == [("firing", a.key, False), ("firing", b.key, False), ("resolved", b.key, False),
                                  ("firing", a.key, True)]


CHILD = textwrap.dedent("""
    import sys
    from blocksnap.operations.alerts import AlertManager, Condition
    from blocksnap.operations.model import AlertsConfig, WebhookTarget
    url, state, status = sys.argv[1:4]
    c = Condition("job_failed/vm1/backup/local", "critical", "backup of vm1 to local failed", "disk full",
                  {"volume": "vm1"})
    mgr = AlertManager(AlertsConfig(webhooks=[WebhookTarget(url)]), state, "host1")
    mgr.run({c.key: c} if status == "firing" else {}, float(sys.argv[4]))
    print("delivered", flush=True)
""")


def _crash_after_send(receiver: HttpReceiver, state: str, status: str, now: float) -> None:
    """Run an agent-like child that the receiver kills with SIGKILL once the request
    reached it, before the child can record the delivery."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, receiver.url(), state, status, str(now)],
                            stdout=subprocess.PIPE, text=True)
    receiver.on_request = lambda r: os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    receiver.on_request = None
    assert proc.returncode == -signal.SIGKILL and "delivered" not in out


@pytest.mark.parametrize("status", ["firing", "resolved"])
def test_a_crash_between_send_and_record_gives_a_duplicate_never_a_loss(receiver, tmp_path, status):
    state = str(tmp_path / "alerts.json")
    key = "job_failed/vm1/backup/local"
    c = Condition(key, "critical", "backup of vm1 to local failed", "disk full", {"volume": "vm1"})
    cfg = hook_config(receiver)
    if status == "resolved":
        AlertManager(cfg, state, "host1").run({key: c}, NOW)
        receiver.requests.clear()
    _crash_after_send(receiver, state, status, NOW + 60)
    assert [b["status"] for b in (r.json() for r in receiver.requests)] == [status]    # it was sent ...
    restarted = AlertManager(cfg, state, "host1")
    assert restarted.pending() == {restarted.channels[0].id: 1}                        # ... but not recorded
    active = {key: c} if status == "firing" else {}
    assert restarted.run(active, NOW + 120) == []        # nothing new to say: the owed one is sent again
    assert [b["status"] for b in (r.json() for r in receiver.requests)] == [status, status]
    first, second = (r.json() for r in receiver.requests)
    assert first == second                                # the same notification, not a new alert
    assert restarted.pending() == {}
    assert AlertManager(cfg, state, "host1").run(active, NOW + 180) == []
    assert len(receiver.requests) == 2


def test_a_dead_webhook_is_retried_while_email_is_delivered(tmp_path, smtp_server, caplog):
    dead_port = free_port()                               # nothing listens there yet
    pw = tmp_path / "smtp.pass"
    pw.write_text(smtp_server.password + "\n")
    cfg = AlertsConfig(webhooks=[WebhookTarget(f"http://127.0.0.1:{dead_port}/hook?token=SECRET")],
                       email=EmailConfig(to=["ops@example.com"], smtp=f"127.0.0.1:{smtp_server.port}",
                                         starttls=True, username=smtp_server.user, password_file=str(pw)),
                       remind=REMIND)
    mgr = AlertManager(cfg, str(tmp_path / "alerts.json"), "host1")
    c = cond()
    with caplog.at_level(logging.WARNING, logger="blocksnap.alerts"):
        mgr.run({c.key: c}, NOW)
    assert len(smtp_server.messages) == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "blocksnap.alerts"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "webhook (json) http://127.0.0.1:" in warnings[0] and "SECRET" not in warnings[0]
    assert "1 notification(s) kept to retry" in warnings[0]
    webhook_id = mgr.channels[0].id
    assert mgr.pending() == {webhook_id: 1}

    late = HttpReceiver(dead_port).start()               # the endpoint comes back
    try:
        assert mgr.run({c.key: c}, NOW + 5) == []
        assert late.requests == [] and mgr.pending() == {webhook_id: 1}    # not retried before 15 s
        assert mgr.run({c.key: c}, NOW + 15) == []
        assert [r.json()["status"] for r in late.requests] == ["firing"]
        assert len(smtp_server.messages) == 1            # email is not sent twice
        assert mgr.pending() == {}
    finally:
        late.stop()


def test_a_resolve_owed_to_a_dead_channel_comes_after_its_firing(tmp_path):
    port = free_port()
    cfg = AlertsConfig(webhooks=[WebhookTarget(f"http://127.0.0.1:{port}/hook")], remind=60)
    mgr = AlertManager(cfg, str(tmp_path / "alerts.json"), "host1")
    c = cond()
    mgr.run({c.key: c}, NOW)
    mgr.run({c.key: c}, NOW + 60)        # a reminder, superseded by ...
    mgr.run({c.key: c}, NOW + 120)       # ... this one, superseded by the resolve
    mgr.run({}, NOW + 130)
    back = HttpReceiver(port).start()
    try:
        mgr.deliver()
    finally:
        back.stop()
    assert [(b["status"], b["reminder"]) for b in (r.json() for r in back.requests)] == [
        ("firing", False), ("resolved", False)]


def test_state_file_is_replaced_atomically_and_private(receiver, tmp_path):
    state = tmp_path / "state" / "alerts.json"
    mgr = AlertManager(hook_config(receiver), str(state), "host1")
    c = cond()
    mgr.run({c.key: c}, NOW)
    raw = json.loads(state.read_text())
    assert raw["version"] == 1 and list(raw["alerts"]) == [c.key]
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    assert sorted(os.listdir(state.parent)) == ["alerts.json"]     # no tmp file left


def test_a_damaged_state_file_is_kept_aside_and_alerts_fire_again(receiver, tmp_path, caplog):
    state = tmp_path / "alerts.json"
    state.write_text('{"alerts": {"rpo_b')
    c = cond()
    with caplog.at_level(logging.WARNING, logger="blocksnap.alerts"):
        mgr = AlertManager(hook_config(receiver), str(state), "host1")
    assert "unreadable" in caplog.text
    assert (tmp_path / "alerts.json.bad").read_text() == '{"alerts": {"rpo_b'
    assert [n.status for n in mgr.run({c.key: c}, NOW)] == ["firing"]


def test_reload_without_a_channel_drops_what_it_was_owed(tmp_path):
    cfg = AlertsConfig(webhooks=[WebhookTarget(f"http://127.0.0.1:{free_port()}/hook")])
    mgr = AlertManager(cfg, str(tmp_path / "alerts.json"), "host1")
    c = cond()
    mgr.run({c.key: c}, NOW)
    assert sum(mgr.pending().values()) == 1
    mgr.configure(AlertsConfig())
    assert mgr.pending() == {}
    assert mgr.active_keys() == {c.key}       # the alert itself is still known: no re-fire


def test_check_runs_the_whole_path_from_a_report(receiver, tmp_path):
    mgr = AlertManager(hook_config(receiver), str(tmp_path / "alerts.json"), "host1")
    r = healthy_report()
    j = fail_backup(r)
    assert [n.condition.key for n in mgr.check(r, NOW)] == ["job_failed/vm1/backup/local"]
    j.last_result = "running"                                   # the retry
    assert mgr.check(r, NOW + 60) == []
    mgr = AlertManager(hook_config(receiver), str(tmp_path / "alerts.json"), "host1")   # agent restarted
    assert mgr.check(r, NOW + 90) == []                         # still failed: the retry has not succeeded
    j.last_result, j.last_success = "ok", NOW + 100
    assert [n.status for n in mgr.check(r, NOW + 120)] == ["resolved"]


# -- channels --------------------------------------------------------------------------

def test_webhook_formats(receiver, tmp_path):
    targets = [WebhookTarget(receiver.url(f"/{fmt}"), fmt) for fmt in ("json", "alertmanager", "ntfy", "slack")]
    mgr = AlertManager(AlertsConfig(webhooks=targets, remind=REMIND), str(tmp_path / "a.json"), "host1")
    c = Condition("job_failed/vm1/backup/local", "critical", "backup of vm1 to local failed",
                  "The backup of vm1 to local failed: disk full.", {"volume": "vm1", "job": "backup",
                                                                    "repository": "local"})
    mgr.run({c.key: c}, NOW)
    mgr.run({}, NOW + 600)
    by_path: dict[str, list] = {}
    for r in receiver.requests:
        by_path.setdefault(r.path, []).append(r)
    assert {p: len(v) for p, v in by_path.items()} == {"/json": 2, "/alertmanager": 2, "/ntfy": 2, "/slack": 2}

    fire, res = (r.json() for r in by_path["/json"])
    assert fire == {"version": 1, "status": "firing", "key": c.key, "alertname": "BlocksnapJobFailed",
                    "severity": "critical", "summary": c.summary, "description": c.description,
                    "labels": c.labels, "host": "host1", "time": "2027-01-15T08:00:00Z",
                    "started": "2027-01-15T08:00:00Z", "reminder": False}
    assert res["status"] == "resolved" and res["time"] == "2027-01-15T08:10:00Z"

    (am_fire,), (am_res,) = (r.json() for r in by_path["/alertmanager"])
    assert am_fire["labels"] == {"alertname": "BlocksnapJobFailed", "severity": "critical", "host": "host1",
                                 "key": c.key, "source": "blocksnap-agent", "volume": "vm1", "job": "backup",
                                 "repository": "local"}
    assert am_fire["annotations"] == {"summary": c.summary, "description": c.description}
    assert am_fire["startsAt"] == "2027-01-15T08:00:00Z"
    assert am_fire["endsAt"] == "2027-01-15T16:00:00Z"       # two reminder intervals ahead
    assert am_res["endsAt"] == "2027-01-15T08:10:00Z" and am_res["startsAt"] == am_fire["startsAt"]

    n_fire, n_res = by_path["/ntfy"]
    assert n_fire.body.decode() == c.description
    assert n_fire.headers["Title"] == "[FIRING] backup of vm1 to local failed (host1)"
    assert n_fire.headers["Priority"] == "5" and n_fire.headers["Tags"] == "rotating_light,blocksnap"
    assert n_res.headers["Title"].startswith("[RESOLVED]") and n_res.headers["Priority"] == "2"

    s_fire, s_res = (r.json() for r in by_path["/slack"])
    assert list(s_fire) == ["text"]
    assert s_fire["text"].startswith(":rotating_light: *[FIRING] backup of vm1 to local failed (host1)*")
    assert s_res["text"].startswith(":white_check_mark: *[RESOLVED]")


def test_webhook_error_status_is_a_failure(receiver, tmp_path):
    receiver.status = 503
    mgr = AlertManager(hook_config(receiver), str(tmp_path / "a.json"), "host1")
    c = cond()
    mgr.run({c.key: c}, NOW)
    assert mgr.deliver() == [(mgr.channels[0].name, "HTTP 503 Service Unavailable")]
    receiver.status = 200
    assert mgr.deliver() == []
    assert [r.json()["status"] for r in receiver.requests] == ["firing"] * 3


def test_retries_back_off_so_a_dead_endpoint_does_not_hold_up_each_tick(receiver, tmp_path):
    receiver.status = 503
    mgr = AlertManager(hook_config(receiver), str(tmp_path / "a.json"), "host1")
    c = cond()
    tries = []
    for dt in range(0, 400, 5):                          # the agent's 5 s ticks
        before = len(receiver.requests)
        mgr.run({c.key: c}, NOW + dt)
        if len(receiver.requests) > before:
            tries.append(dt)
    assert tries == [0, 15, 45, 105, 225]                # 15 s, doubling, at most 300 s apart
    receiver.status = 200
    assert mgr.run({c.key: c}, NOW + 525) == [] and mgr.pending() == {}


def test_email_over_starttls_with_a_password_file(tmp_path, smtp_server):
    pw = tmp_path / "smtp.pass"
    pw.write_text(smtp_server.password + "\n")
    email_cfg = EmailConfig(to=["ops@example.com", "oncall@example.com"], smtp=f"127.0.0.1:{smtp_server.port}",
                            starttls=True, username=smtp_server.user, password_file=str(pw))
    mgr = AlertManager(AlertsConfig(email=email_cfg), str(tmp_path / "a.json"), "host1")
    c = cond()
    mgr.run({c.key: c}, NOW)
    mgr.run({}, NOW + 60)
    assert smtp_server.logins == ["agent", "agent"] and smtp_server.tls_sessions == 2
    fire, res = smtp_server.messages
    assert fire["Subject"] == "[blocksnap] [FIRING] summary of rpo_breached/vm1 (host1)"
    assert fire["From"] == "blocksnap@host1"
    assert fire["To"] == "ops@example.com, oncall@example.com"
    assert fire["X-Blocksnap-Alert-Key"] == c.key and fire["X-Blocksnap-Alert-Status"] == "firing"
    body = fire.get_payload()
    assert "description of rpo_breached/vm1" in body and "severity: critical" in body
    assert res["Subject"].startswith("[blocksnap] [RESOLVED]")


def test_email_with_a_wrong_password_is_kept_for_retry(tmp_path, smtp_server, caplog):
    pw = tmp_path / "smtp.pass"
    pw.write_text("wrong\n")
    email_cfg = EmailConfig(to=["ops@example.com"], smtp=f"127.0.0.1:{smtp_server.port}", starttls=True,
                            username=smtp_server.user, password_file=str(pw))
    mgr = AlertManager(AlertsConfig(email=email_cfg), str(tmp_path / "a.json"), "host1")
    c = cond()
    with caplog.at_level(logging.WARNING, logger="blocksnap.alerts"):
        mgr.run({c.key: c}, NOW)
    assert smtp_server.messages == [] and "SMTP 127.0.0.1" in caplog.text and "535" in caplog.text
    pw.write_text(smtp_server.password + "\n")
    mgr.deliver()
    assert len(smtp_server.messages) == 1
    pw.unlink()                                           # an unreadable password file: one line, kept
    mgr.run({}, NOW + 60)
    assert "password file" in caplog.text and sum(mgr.pending().values()) == 1


def test_command_gets_the_variables(tmp_path):
    out = tmp_path / "env.txt"
    script = tmp_path / "page-me"
    script.write_text(f"#!/bin/sh\nenv | grep '^BLOCKSNAP_' | sort >> {out}\ncat > {tmp_path}/stdin.json\n")
    script.chmod(0o755)
    mgr = AlertManager(AlertsConfig(command=f"{script} --urgent"), str(tmp_path / "a.json"), "host1")
    c = cond()
    mgr.run({c.key: c}, NOW)
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env == {"BLOCKSNAP_ALERT_STATUS": "firing", "BLOCKSNAP_ALERT_KEY": c.key,
                   "BLOCKSNAP_ALERT_NAME": "BlocksnapRPOBreached", "BLOCKSNAP_ALERT_SEVERITY": "critical",
                   "BLOCKSNAP_ALERT_SUMMARY": c.summary, "BLOCKSNAP_ALERT_DESCRIPTION": c.description,
                   "BLOCKSNAP_ALERT_LABELS": '{"volume": "vm1"}', "BLOCKSNAP_ALERT_STARTED": "2027-01-15T08:00:00Z",
                   "BLOCKSNAP_ALERT_TIME": "2027-01-15T08:00:00Z", "BLOCKSNAP_ALERT_REMINDER": "0",
                   "BLOCKSNAP_HOST": "host1"}
    assert json.loads((tmp_path / "stdin.json").read_text())["key"] == c.key
    mgr.run({}, NOW + 60)
    assert "BLOCKSNAP_ALERT_STATUS=resolved" in out.read_text()


def test_a_failing_or_hung_command_is_retried(tmp_path, caplog):
    flag = tmp_path / "ok"
    script = tmp_path / "page-me"
    script.write_text(f"#!/bin/sh\n[ -e {flag} ] && exit 0\necho 'pager down' >&2\nexit 3\n")
    script.chmod(0o755)
    mgr = AlertManager(AlertsConfig(command=str(script)), str(tmp_path / "a.json"), "host1")
    c = cond()
    with caplog.at_level(logging.WARNING, logger="blocksnap.alerts"):
        mgr.run({c.key: c}, NOW)
    assert "exit 3 pager down" in caplog.text
    flag.touch()
    assert mgr.deliver() == [] and mgr.pending() == {}

    hung = AlertManager(AlertsConfig(command="sleep 600"), str(tmp_path / "b.json"), "host1")
    hung.channels[0].timeout = 0.5
    hung.run({c.key: c}, NOW)
    assert hung.deliver() == [(hung.channels[0].name, "sleep: killed after 0.5 s")]


def test_pings(receiver):
    cfg = AlertsConfig(ping=receiver.url("/ping/abc-123"))
    assert ping(cfg, "backup", "vm1", "start")
    assert ping(cfg, "backup", "vm1", "success", "stored 12 MiB")
    assert ping(cfg, "backup", "vm1", "fail", "disk full")
    assert [(r.method, r.path, r.body) for r in receiver.requests] == [
        ("POST", "/ping/abc-123/start", b"backup vm1 start"), ("POST", "/ping/abc-123", b"stored 12 MiB"),
        ("POST", "/ping/abc-123/fail", b"disk full")]
    assert ping_url("https://hc.example/{kind}-{volume}/", "backup", "vm 1", "fail") == \
        "https://hc.example/backup-vm%201/fail"
    assert not ping(AlertsConfig(), "backup", "vm1", "start")         # no ping configured


def test_a_dead_ping_url_is_logged_not_raised(caplog):
    cfg = AlertsConfig(ping=f"http://127.0.0.1:{free_port()}/ping/x")
    with caplog.at_level(logging.WARNING, logger="blocksnap.alerts"):
        assert ping(cfg, "snapshot", "vm1", "start", timeout=2) is False
    assert len(caplog.records) == 1 and "ping snapshot vm1 start" in caplog.text


def test_every_channel_gets_the_same_alert(receiver, tmp_path, smtp_server):
    pw = tmp_path / "smtp.pass"
    pw.write_text(smtp_server.password)
    out = tmp_path / "cmd.txt"
    cfg = AlertsConfig(webhooks=[WebhookTarget(receiver.url(), "json")],
                       email=EmailConfig(to=["ops@example.com"], smtp=f"127.0.0.1:{smtp_server.port}",
                                         starttls=True, username=smtp_server.user, password_file=str(pw)),
                       command=f"sh -c 'echo $BLOCKSNAP_ALERT_KEY >> {out}'")
    mgr = AlertManager(cfg, str(tmp_path / "a.json"), "host1")
    r = healthy_report()
    breach_rpo(r)
    mgr.check(r, NOW)
    wait_for(lambda: smtp_server.messages, "the email")
    assert receiver.requests[0].json()["key"] == "rpo_breached/vm1"
    assert smtp_server.messages[0]["X-Blocksnap-Alert-Key"] == "rpo_breached/vm1"
    assert out.read_text() == "rpo_breached/vm1\n"
