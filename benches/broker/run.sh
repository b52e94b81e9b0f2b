#!/bin/bash
# Usage: ./run.sh <rmqtt|rumqttd> <N> [conc] [window_s]    -> appends RESULT line to results.txt
# Starts a fresh broker process (port 0 / free port), runs the load generator against it, stops it.
set -u
ulimit -n 20000
cd benches/broker
B=$1; N=$2; C=${3:-200}; W=${4:-60}
BIN=./bench-$B/target/release/bench-$B
LOG=logs/$B-$N.log; mkdir -p logs
$BIN 0 > logs/$B-$N.out 2> $LOG &
BPID=$!
for i in $(seq 50); do grep -q LISTENING logs/$B-$N.out 2>/dev/null && break; sleep 0.1; done
ADDR=$(awk '/LISTENING/{print $2}' logs/$B-$N.out)
sleep 1
echo "broker=$B pid=$BPID addr=$ADDR"
./loadgen/target/release/loadgen bench $ADDR $N $BPID $C $W 2> logs/$B-$N.loadgen.err | sed "s/^RESULT/RESULT broker=$B/" | tee -a results.txt
tail -3 logs/$B-$N.loadgen.err
kill $BPID; wait $BPID 2>/dev/null
