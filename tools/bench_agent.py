#!/usr/bin/env python3
"""The agent's own cost (issue 13): planning for many volumes, and CPU while idle.

  plan       schedule.plan (what is due now) and schedule.upcoming (every run of
             the next 24 h) for N volumes under a policy of five [[volume]] rules
             (intervals, times of day, windows crossing midnight with exclusions,
             copies, drills, verification), from synthetic history; wall time of
             each, best of --repeat
  idle       a real pool of --idle-volumes small volumes, each snapshotted and
             backed up once by `agent --once`; then `blocksnap agent` runs for
             --seconds with nothing due: the agent's and the daemon's CPU seconds
             over that time (from /proc/<pid>/stat)

Usage: tools/bench_agent.py [--volumes 500] [--repeat 3] [--idle-volumes 20] [--seconds 60] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from blocksnap.operations import schedule
from blocksnap.operations.policy import load
from blocksnap.operations.schedule import JobFacts, VolumeFacts

POLICY = """\
timezone = "Europe/Berlin"
[[repository]]
name = "local"
url = "file://{d}/repo"
password_file = "{d}/pw"
[[repository]]
name = "cloud"
url = "s3://b/p"
password_file = "{d}/pw"
offsite = true
[[volume]]
match = ["vm0*"]
rpo = "1h"
snapshot = {{ every = "15m" }}
backup = {{ to = ["local"], every = "1h", full = ["sun"], window = "22:00-06:00", except = ["01:00-01:30"] }}
copy = [{{ from = "local", to = "cloud", every = "1d", window = "02:00-05:00" }}]
verify = {{ cycle = "30d", budget = "20G" }}
[[volume]]
match = ["vm1*"]
rpo = "4h"
snapshot = {{ at = ["00:00", "04:00", "08:00", "12:00", "16:00", "20:00"] }}
backup = {{ to = ["local", "cloud"], every = "4h" }}
[[volume]]
match = ["vm2*"]
rpo = "1d"
backup = {{ to = ["cloud"], at = ["23:00"], days = ["mon-fri"], differential = ["wed"] }}
drill = {{ every = "7d", repository = "cloud" }}
[[volume]]
match = ["vm3*"]
rpo = "30m"
snapshot = {{ every = "10m" }}
backup = {{ to = ["local"], every = "30m" }}
[[volume]]
match = ["*"]
rpo = "1d"
snapshot = {{ every = "1h" }}
backup = {{ to = ["local"], every = "1d", window = {{ times = "20:00-07:00", days = ["mon-fri"] }} }}
"""


def facts_for(n: int, now: float) -> list[VolumeFacts]:
    out = []
    for i in range(n):
        name = f"vm{i % 5}{i:04d}"
        ok = {"id": i, "started": now - 1800 - i, "ended": now - 1700 - i, "result": "ok",
              "info": {"snapshot": "s", "snapshot_created": now - 1800 - i, "mode": "incremental"}}
        out.append(VolumeFacts(name, newest_snapshot=now - 600 - i, newest_name="s", snapshot_names={"s"},
                               jobs={("backup", "local"): JobFacts(last_ok=ok, last=ok)}))
    return out + [VolumeFacts("")]


def bench_plan(n: int, repeat: int) -> dict:
    d = tempfile.mkdtemp(prefix="bench-agent-")
    with open(os.path.join(d, "pw"), "w") as f:
        f.write("x\n")
    with open(os.path.join(d, "p.toml"), "w") as f:
        f.write(POLICY.format(d=d))
    policy = load(os.path.join(d, "p.toml"))
    now = time.time()
    facts = facts_for(n, now)
    res: dict = {"volumes": n}
    for name, fn in (("plan_s", lambda: schedule.plan(policy, facts, now)),
                     ("upcoming_24h_s", lambda: schedule.upcoming(policy, facts, now, now + 86400))):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        res[name] = round(min(times), 3)
        res[name.replace("_s", "_runs")] = len(out)
    return res


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_idle(volumes: int, seconds: float) -> dict:
    d = tempfile.mkdtemp(prefix="bench-agent-idle-")
    pool = os.path.join(d, "pool")
    cli = [sys.executable, "-m", "blocksnap", "-q", "--pool", pool]
    subprocess.run(cli + ["pool", "init", "--size", "4G"], check=True)
    for i in range(volumes):
        subprocess.run(cli + ["volume", "create", f"vm{i}", "--size", "64M"], check=True)
    with open(os.path.join(d, "pw"), "w") as f:
        f.write("x\n")
    with open(os.path.join(d, "p.toml"), "w") as f:
        f.write(f'[[repository]]\nname = "local"\nurl = "file://{d}/repo"\npassword_file = "{d}/pw"\n'
                '[[volume]]\nmatch = ["*"]\nrpo = "1h"\nsnapshot = { every = "1h" }\n'
                'backup = { to = ["local"], every = "1h" }\n[metrics]\nlisten = "127.0.0.1:0"\n')
    subprocess.run(cli + ["agent", "--policy", os.path.join(d, "p.toml"), "--once"], check=True)
    agent = subprocess.Popen(cli + ["agent", "--policy", os.path.join(d, "p.toml")], start_new_session=True)
    try:
        time.sleep(10)                       # started, daemon up, first look done
        from blocksnap.service import daemon_spawn
        daemon_pid = (daemon_spawn.status(pool) or {}).get("pid", 0)
        a0, d0, t0 = _cpu(agent.pid), _cpu(daemon_pid) if daemon_pid else 0.0, time.monotonic()
        time.sleep(seconds)
        a1, d1, t1 = _cpu(agent.pid), _cpu(daemon_pid) if daemon_pid else 0.0, time.monotonic()
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait()
        subprocess.run(cli + ["stop", "--force"], check=False)
    wall = t1 - t0
    return {"volumes": volumes, "seconds": round(wall, 1), "agent_cpu_s": round(a1 - a0, 2),
            "agent_cpu_percent": round(100 * (a1 - a0) / wall, 2),
            "daemon_cpu_s": round(d1 - d0, 2) if daemon_pid else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--idle-volumes", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = {"plan": bench_plan(a.volumes, a.repeat)}
    if not a.skip_idle:
        out["idle"] = bench_idle(a.idle_volumes, a.seconds)
    print(json.dumps(out, indent=1) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
