#!/usr/bin/env bash
# device call E (right after D, warm): Ray x90 auto with py-spy on a pipeline actor
set -u
export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
[ -f /tmp/site/.unpacked-ray ] || { xz -T0 -d < .raywheels/site.tar.xz | tar x -C /tmp && touch /tmp/site/.unpacked-ray; }
PYSPY=/tmp/site/py_spy-0.4.3.data/scripts/py-spy; chmod +x $PYSPY; echo "py-spy: $PYSPY" > $R/env.txt
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/env.txt
t=$(date +%s%N)
timeout 200 python trt_inference.py --ray --random-init --backend torch --inputs /tmp/h264x90.csv --window-seconds 2 \
  --decoder auto --output /tmp/out_ray_x90 --no-progress -v > $R/ray_x90.log 2>&1 &
JOB=$!
for i in $(seq 120); do grep -q "Running Dataset" $R/ray_x90.log && break; sleep 1; done
sleep 8
P=$(pgrep -f "MapWorker" | head -1); [ -n "$P" ] || P=$(pgrep -f "ray::" | head -1)
ps -o pid,ppid,pcpu,nlwp,cmd -p $P >> $R/env.txt 2>&1
timeout 30 $PYSPY record -d 12 -r 100 --threads --nonblocking --format raw -o $R/ray_actor.raw --pid $P > $R/pyspy_ray.txt 2>&1
top -b -n 1 -w 200 | head -40 > $R/top_ray.txt
wait $JOB; echo "ray_x90 rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/env.txt
cp /tmp/out_ray_x90/summary.json $R/ray_x90.summary.json 2>/dev/null; pack
