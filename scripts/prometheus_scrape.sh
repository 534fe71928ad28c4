#!/usr/bin/env bash
# A real Prometheus scraping a real limiterd, on loopback. Needs Debian's `prometheus`
# package (apt-get install prometheus). Prints what Prometheus stored for a few series.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
command -v prometheus >/dev/null || { echo "prometheus is not installed (apt-get install prometheus)"; exit 2; }
tmp=$(mktemp -d)
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port); metrics_port=$(free_port); prom_port=$(free_port)
cleanup() { kill "${daemon_pid:-}" "${prom_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

"$PY" -m limiterd serve --listen "127.0.0.1:$grpc_port" --db :memory: \
  --metrics-listen "127.0.0.1:$metrics_port" --log-level warning & daemon_pid=$!
cat > "$tmp/prometheus.yml" <<YML
global: {scrape_interval: 1s}
scrape_configs:
  - job_name: limiterd
    static_configs: [{targets: ["127.0.0.1:$metrics_port"]}]
YML
prometheus --config.file "$tmp/prometheus.yml" --storage.tsdb.path "$tmp/data" \
  --web.listen-address "127.0.0.1:$prom_port" --log.level warn >"$tmp/prom.log" 2>&1 & prom_pid=$!

# Some traffic: Acquire + Report cycles through the daemon.
"$PY" - "$grpc_port" <<'PYCODE'
import sys, time, grpc
from limiterd_client._proto.limiter.v1 import limiter_pb2 as pb, limiter_pb2_grpc as g
ch = grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")
grpc.channel_ready_future(ch).result(timeout=20)
stub = g.LimiterStub(ch)
for _ in range(20):
    r = stub.Acquire(pb.AcquireRequest(scope="s", model="claude-sonnet-4-5", input_tokens=100, max_output_tokens=50))
    stub.Report(pb.ReportRequest(reservation_id=r.reservation_id, actual_input_tokens=90, actual_output_tokens=10, outcome=pb.OK))
PYCODE

query() {
  "$PY" - "$prom_port" "$1" <<'PYCODE'
import json, sys, urllib.parse, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/v1/query?query=" + urllib.parse.quote(sys.argv[2])
data = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
print(sys.argv[2], "=>", [(r["metric"], r["value"][1]) for r in data])
sys.exit(0 if data else 1)
PYCODE
}
for _ in $(seq 1 30); do
  if query 'limiterd_acquires_total{result="granted"}' >/dev/null 2>&1; then break; fi
  sleep 1
done
query 'limiterd_acquires_total{result="granted"}'
query 'limiterd_tokens_total{kind="refunded"}'
query 'limiterd_bucket_capacity{dimension="input_tokens"}'
query 'sum by (method) (limiterd_rpc_duration_seconds_count)'
echo "a real Prometheus scraped limiterd on 127.0.0.1:$metrics_port"
