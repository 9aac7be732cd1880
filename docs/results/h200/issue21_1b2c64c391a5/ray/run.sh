#!/usr/bin/env bash
# device call J (right after I, warm): Ray x90 auto (resource tracker lines after 855042f), Ray's GPU test
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
T1=$(date +%s)
timeout 200 python -m pytest -q -rA tests/test_pipelines_gpu.py -k ray > $R/gpu_ray_test.log 2>&1
echo "ray test rc=$? $(( $(date +%s) - T1 )) s" >> $R/env.txt; pack
