#!/usr/bin/env bash
# device call H (diagnostic, temporary code): Ray x90 auto with a watcher of each actor's resource tracker
set -u
export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
[ -f /tmp/site/.unpacked-ray ] || { xz -T0 -d < .raywheels/site.tar.xz | tar x -C /tmp && touch /tmp/site/.unpacked-ray; }
t=$(date +%s%N)
timeout 200 python trt_inference.py --ray --random-init --backend torch --inputs /tmp/h264.csv --window-seconds 2 \
  --decoder auto --output /tmp/out_ray --no-progress -v > $R/ray.log 2>&1
echo "ray rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/env.txt
grep "tracker-watch\|resource_tracker.py:\|KeyError" $R/ray.log | cut -c1-250 > $R/watch.txt; pack
