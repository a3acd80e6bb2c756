#!/bin/bash
# The blocksnap demo: a pool in ./demo/pool; an ext4 image imported, snapshotted,
# changed, diffed, exported, sent to a second pool and backed up to an encrypted
# repository and restored; a 4 TiB thin volume backed up at the cost of what it
# holds; a backup mounted without a restore, a restore drill, instant recovery
# into a live volume; a live volume attached as a loop device through
# FUSE, snapshotted with its filesystem frozen, a file pulled back from the
# snapshot mounted read-only; small random I/O served by compiled FUSE callbacks
# without Python; a policy run by the agent (snapshots, backups, a
# 3-2-1 copy, verification, metrics, an alert); rollback, scrub, check. Run as root on Debian:
#     bash tools/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
DEMO=${DEMO_DIR:-$PWD/demo}
export BLOCKSNAP_POOL=$DEMO/pool
rm -rf "$DEMO"; mkdir -p "$DEMO/files"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "an ext4 disk image with some files (mkfs.ext4 -d, no mount needed)"
echo "version 1 of the config" > "$DEMO/files/app.conf"
head -c 3M /dev/urandom > "$DEMO/files/data.bin"
run mkfs.ext4 -q -F -d "$DEMO/files" "$DEMO/disk.img" 256M
run ls -ls "$DEMO/disk.img"

step "a pool in a local directory (thin: the data store is a sparse file)"
run blocksnap pool init --size 4G
run blocksnap volume import vm1 "$DEMO/disk.img"
run blocksnap snapshot create vm1@before-upgrade --label ticket=42
run blocksnap snapshot list

step "the live volume changes (here through the Python API; 'blocksnap attach' gives a loop device)"
python - <<'PY'
import os, blocksnap
with blocksnap.Pool.open(os.environ["BLOCKSNAP_POOL"]) as pool:
    vol = pool.volume("vm1")
    vol.write(100 << 20, os.urandom(5 << 20))   # 5 MiB somewhere in the middle
    vol.discard(200 << 20, 1 << 20)             # and a discard
    vol.flush()
print("wrote 5 MiB at 100 MiB, discarded 1 MiB at 200 MiB")
PY
run blocksnap snapshot create vm1@after-upgrade
run blocksnap snapshot diff vm1@before-upgrade vm1@after-upgrade

step "export the old snapshot as a raw image (holes stay holes) and check its filesystem"
run blocksnap export vm1@before-upgrade "$DEMO/before.img"
run ls -ls "$DEMO/before.img"
run e2fsck -fn "$DEMO/before.img"
run cmp "$DEMO/before.img" "$DEMO/disk.img" && echo "export is identical to the imported image"

step "copy both snapshots to a second pool: a full stream through a pipe, then an incremental one"
OFF=$DEMO/offsite
run blocksnap --pool "$OFF" pool init --size 1G
printf '$ blocksnap send vm1@before-upgrade | blocksnap --pool %s receive vm1\n' "$OFF"
blocksnap send vm1@before-upgrade | blocksnap --pool "$OFF" receive vm1
run blocksnap send vm1@after-upgrade --from vm1@before-upgrade -o "$DEMO/vm1-incremental.bs"
run ls -l "$DEMO/vm1-incremental.bs"
run blocksnap --pool "$OFF" receive vm1 -i "$DEMO/vm1-incremental.bs"
run blocksnap --pool "$OFF" snapshot list
run blocksnap --pool "$OFF" export vm1@after-upgrade "$DEMO/offsite-after.img"
run blocksnap export vm1@after-upgrade "$DEMO/after.img"
run cmp "$DEMO/offsite-after.img" "$DEMO/after.img" && echo "the copy in the second pool is identical"

step "back both snapshots up to an encrypted repository (full, then incremental), restore one"
export BLOCKSNAP_REPO=file://$DEMO/repo BLOCKSNAP_REPO_PASSWORD=demo-password
run blocksnap backup vm1@before-upgrade
run blocksnap backup vm1@after-upgrade
run blocksnap backups
LAST=$(blocksnap backups --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["id"])')
run blocksnap restore "$LAST" "$DEMO/restored-after.img" --verify
run cmp "$DEMO/restored-after.img" "$DEMO/after.img" && echo "the restored image is identical to the snapshot"
run blocksnap verify --read-data
run blocksnap prune --keep-last 1
run e2fsck -fn "$DEMO/restored-after.img"

step "recovery without a restore: a backup's files mounted, a restore drill, instant recovery into a live volume"
MB=$DEMO/mnt-backup; mkdir -p "$MB"
run blocksnap mount "$LAST" "$MB"                  # chunks fetched on demand, nothing restored
run cat "$MB/app.conf"
run blocksnap umount "$MB"
run blocksnap drill "$LAST" --check fsck          # brought up on a throwaway overlay, fsck'd, RTO measured
run blocksnap volume create vm1-now --from-backup "$LAST"     # usable at once; the rest hydrates in the background
for _ in $(seq 120); do
    blocksnap volume show vm1-now --json | python3 -c 'import json, sys; h = json.load(sys.stdin).get("hydration", {}); sys.exit(0 if h.get("state") in (None, "done") or h.get("finished") else 1)' && break
    sleep 0.5
done
run blocksnap volume show vm1-now
run blocksnap snapshot create vm1-now@hydrated
run blocksnap export vm1-now@hydrated "$DEMO/now.img"
run cmp "$DEMO/now.img" "$DEMO/after.img" && echo "the instantly recovered volume, hydrated, equals the snapshot backed up"

step "a 4 TiB thin volume holding 32 MiB: its backups cost what it holds (sparse manifests)"
run blocksnap volume create huge --size 4T
python3 -c '
import os, blocksnap
with blocksnap.Pool.open(os.environ["BLOCKSNAP_POOL"]) as pool:
    v = pool.volume("huge")
    for i in range(32):
        v.write(i * (128 << 30), os.urandom(1 << 20))   # 1 MiB every 128 GiB
'
run blocksnap snapshot create huge@mon
run blocksnap backup huge@mon
run blocksnap snapshot create huge@tue
run blocksnap backup huge@tue     # nothing changed: nothing read, one small manifest
echo "a smaller size needs --shrink (the data past it would be lost):"
blocksnap volume resize huge 1T || true
run blocksnap volume resize huge 1T --shrink

step "a live volume as a block device: attach (FUSE + loop), make a filesystem, write files"
MNT=$DEMO/mnt-live; RESTORE=$DEMO/mnt-restore; mkdir -p "$MNT" "$RESTORE"
cleanup() {
    umount "$MNT" 2>/dev/null || true
    blocksnap umount "$RESTORE" 2>/dev/null || true
    blocksnap stop --force >/dev/null 2>&1 || true
}
trap cleanup EXIT
run blocksnap volume create www --size 1G
DEV=$(blocksnap attach www); echo "attached www as $DEV"
run mkfs.ext4 -q "$DEV"
run mount "$DEV" "$MNT"
echo "<h1>version 1</h1>" > "$MNT/index.html"; sync
run blocksnap snapshot create www@v1 --freeze "$MNT" --label release=1
echo "<h1>version 2 (broken)</h1>" > "$MNT/index.html"; sync
run cat "$MNT/index.html"

step "pull the old file back from the snapshot, mounted read-only"
run blocksnap mount www@v1 "$RESTORE"
run cat "$RESTORE/index.html"
run cp "$RESTORE/index.html" "$MNT/index.html"
run blocksnap umount "$RESTORE"
run cat "$MNT/index.html"
run blocksnap snapshot show www@v1
run umount "$MNT"
run blocksnap detach www

step "small random I/O, as a VM or a database does it: compiled FUSE callbacks serve it without Python"
run blocksnap volume create db --size 256M
DBDEV=$(blocksnap attach db); echo "attached db as $DBDEV"
dd if=/dev/urandom of="$DBDEV" bs=1M count=64 oflag=direct status=none
python3 - "$DBDEV" <<'PY'
import mmap, os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)                      # (O_DIRECT wants an aligned buffer)
buf.write(os.urandom(4096))
rnd, n, t = random.Random(1), 20000, time.monotonic()
for i in range(n):
    off = rnd.randrange(0, 64 << 20, 4096)
    (os.pwritev if i % 2 else os.preadv)(fd, [buf], off)
os.close(fd)
print(f"{n} random 4 KiB reads and writes, one at a time: {n / (time.monotonic() - t):,.0f} a second")
PY
run blocksnap pool status
run blocksnap detach db
run blocksnap stop
trap - EXIT

step "a policy the agent carries out by itself: snapshots, backups, a 3-2-1 copy, verification, metrics, alerts"
echo "demo password" > "$DEMO/repo.pass"; chmod 600 "$DEMO/repo.pass"
HOOK_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
METRICS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$DEMO/policy.toml" <<TOML
[[repository]]
name = "local"
url = "file://$DEMO/repo-policy"
password_file = "$DEMO/repo.pass"

[[repository]]
name = "usb"                      # the copy off site (a removable disk, here a directory)
url = "file://$DEMO/repo-usb"
password_file = "$DEMO/repo.pass"
medium = "removable"
offsite = true

[[repository]]
name = "dead"                     # an S3 endpoint nobody answers: its backups fail, and say so
url = "s3://nowhere/blocksnap"
endpoint = "http://127.0.0.1:9"
password_file = "$DEMO/repo.pass"

[[volume]]
match = ["vm1", "www"]
rpo = "1h"
snapshot = { every = "15m" }
keep_snapshots = { last = 3 }
backup = { to = ["local"], every = "1h", full = ["sun"] }
keep_backups = { daily = 7, weekly = 4 }
copy = [{ from = "local", to = "usb", every = "1d" }]
verify = { cycle = "30d", budget = "1G" }

[[volume]]
match = ["huge"]
rpo = "1d"
backup = { to = ["dead"], every = "1d" }

[alerts]
webhook = ["http://127.0.0.1:$HOOK_PORT/hook"]

[metrics]
listen = "127.0.0.1:$METRICS_PORT"
TOML
run blocksnap policy check "$DEMO/policy.toml"
python3 - "$HOOK_PORT" > "$DEMO/alerts.log" 2>&1 <<'PY' &
import http.server, json, sys
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        a = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print(f"alert received: {a['status']} {a['key']}: {a['summary']}", flush=True)
        self.send_response(200); self.end_headers()
    def log_message(self, *args): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
PY
HOOK_PID=$!
echo "$ blocksnap agent --policy $DEMO/policy.toml   (for 25 seconds, in the background)"
AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo blocksnap agent --policy "$DEMO/policy.toml" 2> "$DEMO/agent.log" &
AGENT_PID=$!
trap 'kill $AGENT_PID $HOOK_PID 2>/dev/null || true; blocksnap stop --force >/dev/null 2>&1 || true' EXIT
sleep 25
run blocksnap jobs
run blocksnap status --policy "$DEMO/policy.toml"
echo "$ curl http://127.0.0.1:$METRICS_PORT/metrics | grep ..."
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics').read().decode())" \
    | grep -E '^blocksnap_(recovery_point_age_seconds|copies|verify_coverage_ratio|job_failures_total)' || true
cat "$DEMO/alerts.log"
echo "$ blocksnap status --check   (for a monitor: its exit status says the worst)"
blocksnap status --policy "$DEMO/policy.toml" --check || echo "exit status $?"
kill "$AGENT_PID"; wait "$AGENT_PID" || true
kill "$HOOK_PID" 2>/dev/null || true
run blocksnap stop
trap - EXIT

step "roll back, then verify data and metadata"
run blocksnap snapshot rollback vm1@before-upgrade
run blocksnap snapshot diff vm1@before-upgrade
run blocksnap scrub vm1
run blocksnap check
run blocksnap pool status
printf '\ndemo done: pool in %s\n' "$BLOCKSNAP_POOL"
