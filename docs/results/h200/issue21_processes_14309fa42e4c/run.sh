#!/usr/bin/env bash
# device call: pipelines per GPU (processes) x NVDEC sessions each, long runs (3,200 clips), H.264 + HEVC10
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" > $R/gpu.txt
python -c "
import glob, os
from iv2trt.bench.pipeline import ensure_test_videos, VIDEO_CODECS
ps = ensure_test_videos('/tmp/h264', 16, VIDEO_CODECS['h264'], processes=8, footage=sorted(glob.glob('.footage/*')))
with open('/tmp/h264.csv', 'w') as f:
    f.write('path,id\n')
    for r in range(30):
        for p in ps: f.write(f'{os.path.abspath(p)},r{r}_{p.name}\n')
ps = sorted(glob.glob('.hevc12/*.mp4'))
with open('/tmp/hevc.csv', 'w') as f:
    f.write('path,id\n')
    for r in range(16):
        for p in ps: f.write(f'{os.path.abspath(p)},r{r}_{os.path.basename(p)}\n')
" >> $R/gpu.txt 2>&1
job() {  # name csv decoder extra...
  local n=$1 c=$2 d=$3; shift 3
  timeout 100 python trt_inference.py --random-init --backend torch --inputs $c --window-seconds 2 \
    --decoder $d --output /tmp/out_$n "$@" > $R/$n.log 2>&1
  echo "$n rc=$?" >> $R/gpu.txt
  cp /tmp/out_$n/summary.json $R/$n.summary.json 2>/dev/null
}
H=/tmp/h264.csv
job h_auto_1x8 $H auto
job h_auto_2x4 $H auto --gpus 0,0 --nvdec-sessions 4
job h_auto_2x8 $H auto --gpus 0,0
job h_auto_3x4 $H auto --gpus 0,0,0 --nvdec-sessions 4
job h_cpu_1 $H cpu
job h_cpu_2 $H cpu --gpus 0,0
pack
E=/tmp/hevc.csv
job e_cpu_1 $E cpu
job e_auto_1x8 $E auto
job e_auto_2x4 $E auto --gpus 0,0 --nvdec-sessions 4
job e_auto_2x8 $E auto --gpus 0,0
pack
