#!/usr/bin/env bash
# device call N: CUDA sync mode (spin vs block) and SCHED_IDLE CPU workers, 7,200 clips each (vmstat, dmon)
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
lscpu > $R/lscpu.txt 2>&1
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/gpu.txt
T0=$(date +%s)
python -c "
import glob, os
from iv2trt.bench.pipeline import ensure_test_videos, VIDEO_CODECS
ps = ensure_test_videos('/tmp/h264', 16, VIDEO_CODECS['h264'], processes=16, footage=sorted(glob.glob('.footage/*')))
for name, reps in (('h264', 30), ('h264x90', 90)):
    with open(f'/tmp/{name}.csv', 'w') as f:
        f.write('path,id\n')
        for r in range(reps):
            for p in ps: f.write(f'{os.path.abspath(p)},r{r}_{os.path.basename(p)}\n')
" >> $R/gpu.txt 2>&1
echo "videos made in $(( $(date +%s) - T0 )) s" >> $R/gpu.txt
run() {  # name, env assignments..., -- , extra args
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  vmstat 1 > $R/$name.vmstat & local vm=$!
  nvidia-smi dmon -s u -d 1 > $R/$name.dmon & local dm=$!
  local t=$(date +%s%N)
  env "${envs[@]}" timeout 100 python trt_inference.py --random-init --backend torch --inputs /tmp/h264x90.csv \
    --window-seconds 2 --output /tmp/out_$name --no-progress -v "$@" > $R/$name.log 2>&1
  echo "$name rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/gpu.txt
  kill $vm $dm 2>/dev/null
  cp /tmp/out_$name/summary.json $R/$name.summary.json 2>/dev/null; rm -rf /tmp/out_$name; pack
}
run nvdec X=1 -- --decoder nvdec
run nvdec_block IV2TRT_CUDA_SYNC=block -- --decoder nvdec
run auto X=1 -- --decoder auto
run auto_block IV2TRT_CUDA_SYNC=block -- --decoder auto
run auto_block_idle16 IV2TRT_CUDA_SYNC=block IV2TRT_WORKER_SCHED=idle -- --decoder auto --workers 16
run cpu X=1 -- --decoder cpu
run auto_idle16 IV2TRT_WORKER_SCHED=idle -- --decoder auto --workers 16
run auto_b X=1 -- --decoder auto
echo "total $(( $(date +%s) - T0 )) s" >> $R/gpu.txt; pack
