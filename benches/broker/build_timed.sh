#!/bin/bash
# Clean cold release build of each broker bench binary, timed (sources already fetched).
cd benches/broker
for p in bench-rmqtt bench-rumqttd; do
  (cd $p && cargo clean -q && s=$(date +%s.%N) && cargo build --release -q 2>&1 | tail -3; e=$(date +%s.%N);
   echo "$p build_s=$(echo "$e - $s" | bc) crates_in_lock=$(grep -c '^name = ' Cargo.lock) tree_lines=$(cargo tree -e normal --prefix none 2>/dev/null | sort -u | wc -l) bin_bytes=$(stat -c %s target/release/$p)")
done
