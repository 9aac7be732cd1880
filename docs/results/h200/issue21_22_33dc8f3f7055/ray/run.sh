#!/usr/bin/env bash
# device call 2b (right after 2a, warm): Ray's GPU test and the Ray job on the H.264 set, with start-up timing
set -u
export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
[ -f /tmp/site/.unpacked-ray ] || { xz -T0 -d < .raywheels/site.tar.xz | tar x -C /tmp && touch /tmp/site/.unpacked-ray; }
python -c "import av, PyNvVideoCodec, ray; print('have av, nvc, ray', ray.__version__)" > $R/env.txt 2>&1
ls /tmp/h264.csv >> $R/env.txt 2>&1
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/env.txt
T0=$(date +%s)
timeout 200 python -m pytest -q -rA tests/test_pipelines_gpu.py -k ray > $R/gpu_ray_test.log 2>&1
echo "ray test rc=$? $(( $(date +%s) - T0 )) s" >> $R/env.txt; pack
t=$(date +%s.%N)
timeout 150 python trt_inference.py --ray --random-init --backend torch --inputs /tmp/h264.csv --window-seconds 2 \
  --decoder auto --output /tmp/out_ray --no-progress > $R/ray_auto.log 2>&1
echo "ray job rc=$? wall $(echo "$(date +%s.%N) - $t" | bc)" >> $R/env.txt
cp /tmp/out_ray/summary.json $R/ray_auto.summary.json 2>/dev/null; pack
