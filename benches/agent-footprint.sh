#!/usr/bin/env bash
# Footprint of the release fleet-agent beside prometheus-node-exporter (Debian package), in
# the same run on the same machine: binary size, resident memory and CPU over DURATION
# seconds (default 60) after a warm-up.
#
# The agent runs with a 1 s heartbeat and every check and collector on, every second:
# PostgreSQL SELECT 1, Redis PING, HTTP storage, TCP search, ops JSON, event stats, backup
# file, database size, storage directory size, a regional probe, Prometheus SLO text, host
# metrics and podman's container list (METRICS_INTERVAL and CONTAINERS_INTERVAL are 1 s too,
# the heaviest setting). Heartbeats go to a receiver that
# verifies the v1 signatures. node_exporter is scraped once per second over the same window,
# so both do their work every second.
#
# Usage: benches/agent-footprint.sh            (prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-60}
WARMUP=${WARMUP:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
log() { echo "footprint: $*" >&2; }

eval "$(scripts/services postgres redis podman)"
if ! dpkg -s prometheus-node-exporter >/dev/null 2>&1; then
  log "installing prometheus-node-exporter"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus-node-exporter >/dev/null
fi
log "building the release agent"
cargo build --release --quiet -p fleet-agent
agent_bin="$CARGO_TARGET_DIR/release/fleet-agent"
ne_bin=/usr/bin/prometheus-node-exporter

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
app_port=$(free_port); local_port=$(free_port); ne_port=$(free_port)
secret="bench-secret"

# The stand-in application (storage, ops, metrics) and control plane (verifies v1).
cat > "$work/app.py" <<'PY'
import base64, hashlib, hmac, http.server, json, sys
secret = sys.argv[2].encode()
counts = {"ok": 0, "bad": 0}
METRICS = (b'http_request_duration_ms{quantile="0.95"} 180\n'
           b'http_requests_total{status="200"} 95\nhttp_requests_total{status="500"} 5\n'
           b'webhooks_total 10\nwebhook_retries_total 1\n')
OPS = json.dumps({"jobFailures": [], "jobsProcessed1h": 1, "jobsPending": 0,
                  "secrets": {"expired": 0, "unverified": 0}}).encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, code, body=b"", ctype="text/plain"):
        self.send_response(code); self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        if self.path == "/metrics": self.reply(200, METRICS)
        elif self.path == "/ops": self.reply(200, OPS, "application/json")
        elif self.path == "/events": self.reply(200, b'{"total1h":5,"failed1h":0,"avgLagMs":3}', "application/json")
        elif self.path == "/count": self.reply(200, json.dumps(counts).encode(), "application/json")
        else: self.reply(200, b"ok")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        msg = f'{self.headers["webhook-id"]}.{self.headers["webhook-timestamp"]}.'.encode() + body
        want = "v1," + base64.b64encode(hmac.new(secret, msg, hashlib.sha256).digest()).decode()
        good = hmac.compare_digest(want, self.headers.get("webhook-signature", ""))
        counts["ok" if good else "bad"] += 1
        self.reply(200 if good else 401)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$work/app.py" "$app_port" "$secret" & pids+=($!)
echo '{"lastBackupAt":"2026-11-22T02:00:00Z","id":"b-1","sizeBytes":1,"checksum":"c"}' > "$work/backup.json"
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$app_port/count" >/dev/null && break; sleep 0.1; done

env -i PATH="$PATH" \
  INSTANCE_ID=bench-001 CONTROL_PLANE_URL="http://127.0.0.1:$app_port" AGENT_SECRET="$secret" \
  HEARTBEAT_INTERVAL=1 METRICS_INTERVAL=1 CONTAINERS_INTERVAL=1 \
  DATABASE_URL="$FLEET_TEST_POSTGRES_URL" REDIS_URL="$FLEET_TEST_REDIS_URL" \
  STORAGE_ENDPOINT="http://127.0.0.1:$app_port/storage" MEILI_HOST="127.0.0.1:$app_port" \
  AGENT_OPS_URL="http://127.0.0.1:$app_port/ops" AGENT_OPS_TOKEN=t \
  AGENT_METRICS_URL="http://127.0.0.1:$app_port/metrics" BACKUP_META_PATH="$work/backup.json" \
  AGENT_EVENTS_STATS_URL="http://127.0.0.1:$app_port/events" STORAGE_DATA_PATH="$work" \
  PRIMARY_REGION=local REGIONAL_HEALTH_ENDPOINTS="[{\"region\":\"local\",\"endpoint\":\"http://127.0.0.1:$app_port/region\"}]" \
  DOCKER_HOST="$DOCKER_HOST" AGENT_PORT="$local_port" AGENT_STATE_PATH="$work/state.db" \
  RUST_LOG=warn "$agent_bin" 2>"$work/agent.log" & agent_pid=$!; pids+=($agent_pid)
"$ne_bin" --web.listen-address="127.0.0.1:$ne_port" 2>"$work/ne.log" & ne_pid=$!; pids+=($ne_pid)
# `|| true`: errexit would end the loop at the first scrape that races the start.
( while true; do curl -s -o /dev/null "http://127.0.0.1:$ne_port/metrics" || true; sleep 1; done ) & pids+=($!)

log "warming up ${WARMUP}s, then measuring ${DURATION}s"
sleep "$WARMUP"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
a0=$(ticks $agent_pid); n0=$(ticks $ne_pid)
c0=$(curl -s "http://127.0.0.1:$app_port/count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
a_sum=0; a_max=0; n_sum=0; n_max=0; samples=0
for _ in $(seq "$DURATION"); do
  sleep 1
  a=$(rss_kb $agent_pid); n=$(rss_kb $ne_pid)
  a_sum=$((a_sum + a)); n_sum=$((n_sum + n)); samples=$((samples + 1))
  [ "$a" -gt "$a_max" ] && a_max=$a; [ "$n" -gt "$n_max" ] && n_max=$n
done
a1=$(ticks $agent_pid); n1=$(ticks $ne_pid)
counts=$(curl -s "http://127.0.0.1:$app_port/count")
c1=$(echo "$counts" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
bad=$(echo "$counts" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bad"])')
checks=$(curl -s "http://127.0.0.1:$local_port/metrics/agent" | grep '^fleet_agent_check_ok' | tr '\n' ' ')

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
cpu() { awk -v t="$1" -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.2f s (%.2f%% of one core)", t / hz, 100 * t / hz / d }'; }
size() { stat -c %s "$1" | awk '{ printf "%.1f MiB", $1 / 1048576 }'; }

cat <<EOF2
Date: $(date -u +%Y-%m-%dT%H:%M:%SZ) · host: $(nproc) cores, $(uname -r) · window: ${DURATION}s after ${WARMUP}s warm-up
fleet-agent $(git rev-parse --short HEAD 2>/dev/null || echo '?') (release) · $("$ne_bin" --version 2>&1 | head -1)

| | fleet-agent | prometheus-node-exporter |
|---|---|---|
| binary size | $(size "$agent_bin") | $(size "$ne_bin") |
| RSS, mean of ${samples} samples | $(mib $((a_sum / samples))) MiB | $(mib $((n_sum / samples))) MiB |
| RSS, max | $(mib $a_max) MiB | $(mib $n_max) MiB |
| CPU over ${DURATION}s | $(cpu $((a1 - a0))) | $(cpu $((n1 - n0))) |
| work per second | 1 signed heartbeat, 4 checks + 9 collectors | 1 scrape |

Heartbeats verified by the receiver in the window: $((c1 - c0)) (bad signatures: $bad).
Agent checks and collectors at the end: $checks
EOF2
