#!/usr/bin/env bash
# device call A: start-up after ab0b230 (runner profile, CLI wall), CPU workers beside NVDEC with two pipelines,
# same-call nvdec/cpu/auto on 2,400 H.264 clips, a 7,200-clip auto run (steady state)
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
timeout 90 python .devscripts/runner_profile.py > $R/runner_profile.txt 2>&1; pack
job() {  # name csv decoder extra...
  local n=$1 c=$2 d=$3; shift 3
  local t=$(date +%s%N)
  nvidia-smi dmon -s u -d 1 > $R/$n.dmon 2>&1 & local dm=$!
  timeout 150 python trt_inference.py --random-init --backend torch --inputs $c --window-seconds 2 \
    --decoder $d --output /tmp/out_$n --no-progress -v "$@" > $R/$n.log 2>&1
  echo "$n rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/gpu.txt; kill $dm 2>/dev/null
  cp /tmp/out_$n/summary.json $R/$n.summary.json 2>/dev/null
}
job h_auto /tmp/h264.csv auto
job h_auto_w12 /tmp/h264.csv auto --workers 12
pack
job h_nvdec /tmp/h264.csv nvdec
job h_cpu /tmp/h264.csv cpu
pack
job h_auto_w16 /tmp/h264.csv auto --workers 16
job h_auto_x90 /tmp/h264x90.csv auto
pack
python - > $R/compare.txt 2>&1 <<'PY'
import numpy as np
from iv2trt.output.results import load_features
def rows(d):
    f, r = load_features(d); return {(x["id"], x["clip"]): v for v, x in zip(f, r)}
for a, b in (("/tmp/out_h_auto", "/tmp/out_h_cpu"), ("/tmp/out_h_nvdec", "/tmp/out_h_cpu"), ("/tmp/out_h_auto_w12", "/tmp/out_h_cpu")):
    A, B = rows(a), rows(b)
    same = sorted(A) == sorted(B)
    cos = min(float(np.dot(A[k].astype(np.float64), B[k].astype(np.float64)) / np.linalg.norm(A[k].astype(np.float64)) / np.linalg.norm(B[k].astype(np.float64))) for k in A) if same else float("nan")
    print(a, b, "rows", len(A), len(B), "same keys", same, "min cos", cos)
PY
echo "total $(( $(date +%s) - T0 )) s" >> $R/gpu.txt; pack
