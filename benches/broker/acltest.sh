#!/bin/bash
# Usage: ./acltest.sh <rmqtt|rumqttd>
ulimit -n 20000
cd benches/broker; mkdir -p logs
B=$1; BIN=./bench-$B/target/release/bench-$B
$BIN 0 > logs/$B-acl.out 2> logs/$B-acl.log & BPID=$!
for i in $(seq 50); do grep -q LISTENING logs/$B-acl.out 2>/dev/null && break; sleep 0.1; done
sleep 1
ADDR=$(awk '/LISTENING/{print $2}' logs/$B-acl.out)
echo "== $B acl/auth test against $ADDR"
./loadgen/target/release/loadgen acltest $ADDR
kill $BPID; wait $BPID 2>/dev/null
