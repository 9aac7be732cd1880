#!/usr/bin/env bash
# device call B (right after A, warm): Ray's GPU test (fallback categories printed), the Ray job on 2,400 and 7,200 clips
set -u
export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
[ -f /tmp/site/.unpacked-ray ] || { xz -T0 -d < .raywheels/site.tar.xz | tar x -C /tmp && touch /tmp/site/.unpacked-ray; }
python -c "import av, PyNvVideoCodec, ray; print('have av, nvc, ray', ray.__version__)" > $R/env.txt 2>&1
ls /tmp/h264.csv /tmp/h264x90.csv >> $R/env.txt 2>&1
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/env.txt
T0=$(date +%s)
rjob() {  # name csv
  local n=$1 c=$2; local t=$(date +%s%N)
  timeout 200 python trt_inference.py --ray --random-init --backend torch --inputs $c --window-seconds 2 \
    --decoder auto --output /tmp/out_$n --no-progress -v > $R/$n.log 2>&1
  echo "$n rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/env.txt
  cp /tmp/out_$n/summary.json $R/$n.summary.json 2>/dev/null; pack
}
rjob ray_auto /tmp/h264.csv
rjob ray_auto_x90 /tmp/h264x90.csv
timeout 200 python -m pytest -q -rA tests/test_pipelines_gpu.py -k ray > $R/gpu_ray_test.log 2>&1
echo "ray test rc=$? $(( $(date +%s) - T0 )) s" >> $R/env.txt; pack
