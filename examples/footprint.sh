#!/usr/bin/env bash
# Measures the agent's footprint as it ships (the `edge` profile: LTO, one codegen unit,
# stripped): binary size, and idle RSS with no model and with the digits model installed
# through a real rollout. The control plane and CLI are the release builds.
#   bash examples/footprint.sh            (FLOTILLA_BIN=target/debug: control plane from the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile edge --locked -p flotilla-agent >&2
# The control plane and CLI only drive the agent: FLOTILLA_BIN=target/debug reuses the test
# build instead of building them again in release.
bin=${FLOTILLA_BIN:-target/release}
[ -n "${FLOTILLA_BIN:-}" ] || cargo build --release --locked -p flotilla-server -p flotilla >&2
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cp target/edge/flotilla-agent "$work/flotilla-agent.stripped"
echo "agent binary (edge profile, stripped): $(stat -c %s "$work/flotilla-agent.stripped") bytes"

wait_file() { for _ in $(seq 100); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "timeout: $1" >&2; exit 1; }
rss_kib() { awk '/^VmRSS/ {r=$2} /^RssAnon/ {a=$2} /^RssFile/ {f=$2} END {print r " (anonymous " a ", file-backed " f ")"}' "/proc/$1/status"; }

"$bin/flotilla" keygen --out "$work/ops" >/dev/null
"$bin/flotilla" trust init --key "$work/ops.key" --out "$work/root.cbor" >/dev/null
RUST_LOG=warn "$bin/flotilla-server" --data-dir "$work/server" --http 127.0.0.1:0 --mqtt 127.0.0.1:0 2>/dev/null &
wait_file "$work/server/endpoints.json"
http=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/server/endpoints.json")
mqtt=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mqtt"])' "$work/server/endpoints.json")
ca=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("ca", ""))' "$work/server/endpoints.json")
export FLOTILLA_SERVER="https://$http" FLOTILLA_CA="$ca"
FLOTILLA_TOKEN=$(cat "$work/server/admin.token")
export FLOTILLA_TOKEN
"$bin/flotilla" devices certificate footprint-1 --out "$work/device" 2>/dev/null

RUST_LOG=warn "$work/flotilla-agent.stripped" --data-dir "$work/agent" --device-id footprint-1 \
    --broker "mqtts://$mqtt" --ca "$ca" --cert "$work/device.pem" --key "$work/device.key" \
    --trust-root "$work/root.cbor" --api 127.0.0.1:0 2>/dev/null &
agent=$!
wait_file "$work/agent/endpoints.json"
sleep 3
echo "agent idle RSS, no model: $(rss_kib $agent) KiB"

python3 - "$work/golden.json" <<'PY'
import json, sys
t = json.load(open("examples/models/digits_test.json"))["samples"][:2]
reqs = [{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": s["input"]}]} for s in t]
json.dump(reqs, open(sys.argv[1], "w"))
PY
"$bin/flotilla" bundle build --name digits --version 1 --model examples/models/digits_cnn.onnx \
    --golden "$work/golden.json" --out "$work/d.flb" >/dev/null
"$bin/flotilla" bundle sign "$work/d.flb" --key "$work/ops.key" >/dev/null
"$bin/flotilla" bundle push "$work/d.flb" >/dev/null
id=$("$bin/flotilla" rollout start --bundle digits@1)
for _ in $(seq 300); do
    state=$("$bin/flotilla" rollout status "$id" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    [ "$state" != running ] && [ "$state" != pending ] && break; sleep 0.1
done
[ "$state" = completed ] || { echo "rollout $state" >&2; exit 1; }
api=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["api"])' "$work/agent/endpoints.json")
curl -sf "http://$api/v2/models/digits" >/dev/null
sleep 3
echo "agent idle RSS, digits model loaded: $(rss_kib $agent) KiB"
