#!/usr/bin/env bash
# Run one fuzz target (nightly + cargo-fuzz) for SECONDS, seeded from the committed corpora:
# bundle and root files from tests/corpus, MQTT payloads from fuzz/corpus/mqtt_payloads.
#   bash fuzz/run.sh bundle_file 60
# Targets: bundle_head, bundle_file, trust_root, mqtt_payloads.
set -euo pipefail
target=${1:?target}; secs=${2:-60}
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
case "$target" in
    bundle_head|bundle_file) for d in ../tests/corpus/*/; do [ -f "$d/bundle.flb" ] && cp "$d/bundle.flb" "$work/$(basename "$d").flb"; done ;;
    trust_root) for d in ../tests/corpus/*/; do for f in root next-root; do [ -f "$d/$f.cbor" ] && cp "$d/$f.cbor" "$work/$(basename "$d")-$f.cbor"; done; done ;;
    mqtt_payloads) cp corpus/mqtt_payloads/* "$work/" ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
esac
# New inputs the fuzzer finds go to fuzz/corpus/$target (git-ignored); the seeds stay as committed.
mkdir -p "corpus/$target-found"
cargo +nightly fuzz run "$target" "corpus/$target-found" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 12
