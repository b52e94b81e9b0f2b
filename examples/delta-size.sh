#!/usr/bin/env bash
# Measures what a delta update costs: the bytes a device holding the old model downloads, as a
# fraction of the full bundle, when only the last layer (fc, 1.4% of the weights) was retrained.
# Fixtures: examples/models/digits_cnn_wide{,_fc_retrained}.onnx (make_digits.py).
#   bash examples/delta-size.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p flotilla >&2
f=target/release/flotilla
m=examples/models
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Eight golden cases from the held-out set ride along, as in a real bundle.
python3 - "$m/digits_baseline.npy" "$work/golden.npy" <<'PY'
import sys, numpy as np
np.save(sys.argv[2], np.load(sys.argv[1])[:8])
PY
build() { "$f" bundle build --name wide --golden "$work/golden.npy" -o json "$@" >/dev/null; }
build --model "$m/digits_cnn_wide.onnx" --version 1 --out "$work/v1.flb"
build --model "$m/digits_cnn_wide_fc_retrained.onnx" --version 2 --out "$work/v2-full.flb"
build --model "$m/digits_cnn_wide_fc_retrained.onnx" --version 2 --delta-from "$work/v1.flb" --out "$work/v2-delta.flb"
"$f" bundle inspect "$work/v2-delta.flb" -o json | python3 -c '
import json, os, sys
d = json.load(sys.stdin)["download"]
held, fresh, file = d["holding_bases"], d["without_bases"], d["file"]
full = os.path.getsize(sys.argv[1])
print(f"full bundle v2:                    {full} bytes")
print(f"delta bundle file (patch + full):  {file} bytes")
print(f"download, device holding v1:       {held} bytes = {100 * held / full:.2f}% of the full bundle")
print(f"download, device without v1:       {fresh} bytes = {100 * fresh / full:.2f}%")
' "$work/v2-full.flb"
