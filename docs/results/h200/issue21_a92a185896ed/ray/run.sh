#!/usr/bin/env bash
# device call L (right after K, warm): Ray x90 auto (tracker lines after 86265cb), the Ray GPU test twice (summary order fix)
set -u
export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
[ -f /tmp/site/.unpacked-ray ] || { xz -T0 -d < .raywheels/site.tar.xz | tar x -C /tmp && touch /tmp/site/.unpacked-ray; }
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" > $R/env.txt
t=$(date +%s%N)
timeout 200 python trt_inference.py --ray --random-init --backend torch --inputs /tmp/h264x90.csv --window-seconds 2 \
  --decoder auto --output /tmp/out_ray_x90 --no-progress -v > $R/ray_x90.log 2>&1
echo "ray_x90 rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/env.txt
echo "resource_tracker lines: $(grep -c 'resource_tracker' $R/ray_x90.log) KeyError lines: $(grep -c KeyError $R/ray_x90.log) Traceback lines: $(grep -c Traceback $R/ray_x90.log)" >> $R/env.txt
cp /tmp/out_ray_x90/summary.json $R/ray_x90.summary.json 2>/dev/null; pack
for k in 1 2; do
  T1=$(date +%s)
  timeout 150 python -m pytest -q -rA tests/test_pipelines_gpu.py -k ray > $R/gpu_ray_test_$k.log 2>&1
  echo "ray test $k rc=$? $(( $(date +%s) - T1 )) s" >> $R/env.txt; pack
done
