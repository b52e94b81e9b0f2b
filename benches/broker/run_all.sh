#!/bin/bash
# Full matrix; results appended to results.txt (one RESULT line per run) and loadavg to loadavg.txt
cd benches/broker
for N in ${NS:-1000 2000 5000 10000}; do
  for B in ${BS:-rumqttd rmqtt}; do
    echo "$B $N before: $(cat /proc/loadavg)" >> loadavg.txt
    timeout 400 ./run.sh $B $N
    echo "$B $N after: $(cat /proc/loadavg)" >> loadavg.txt
  done
done
