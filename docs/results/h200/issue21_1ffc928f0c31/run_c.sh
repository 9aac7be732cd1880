#!/usr/bin/env bash
# device call C: pipeline start with/without the early workers' server; CPU workers beside NVDEC (8 vs 12, twice)
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
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
timeout 90 python .devscripts/start_profile.py > $R/start_late.txt 2>&1
timeout 90 python .devscripts/start_profile.py --early > $R/start_early.txt 2>&1; pack
job() {  # name csv decoder extra...
  local n=$1 c=$2 d=$3; shift 3
  local t=$(date +%s%N)
  timeout 150 python trt_inference.py --random-init --backend torch --inputs $c --window-seconds 2 \
    --decoder $d --output /tmp/out_$n --no-progress -v "$@" > $R/$n.log 2>&1
  echo "$n rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/gpu.txt
  cp /tmp/out_$n/summary.json $R/$n.summary.json 2>/dev/null
}
job h_auto_a /tmp/h264.csv auto
job h_auto_w12_a /tmp/h264.csv auto --workers 12
pack
job h_auto_b /tmp/h264.csv auto
job h_auto_w12_b /tmp/h264.csv auto --workers 12
pack
job h_auto_w12_x90 /tmp/h264x90.csv auto --workers 12
echo "total $(( $(date +%s) - T0 )) s" >> $R/gpu.txt; pack
