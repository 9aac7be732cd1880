#!/usr/bin/env bash
# device call: the job with pipelines per GPU (default 2 beside NVDEC) vs 1, H.264 2,400 clips + HEVC10 960, GPU tests
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/gpu.txt
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
  nvidia-smi dmon -s u -d 1 > $R/$n.dmon 2>&1 & local dm=$!
  timeout 100 python trt_inference.py --random-init --backend torch --inputs $c --window-seconds 2 \
    --decoder $d --output /tmp/out_$n "$@" > $R/$n.log 2>&1
  echo "$n rc=$?" >> $R/gpu.txt; kill $dm 2>/dev/null
  cp /tmp/out_$n/summary.json $R/$n.summary.json 2>/dev/null
}
H=/tmp/h264.csv
job h_auto $H auto
job h_auto_p1 $H auto --pipelines-per-gpu 1
job h_nvdec $H nvdec
job h_cpu $H cpu
pack
E=/tmp/hevc.csv
job e_cpu $E cpu
job e_auto $E auto
job e_auto_p1 $E auto --pipelines-per-gpu 1
pack
# same rows? (auto 2 pipelines vs 1: features of one path vs another: min cos)
python - > $R/compare.txt 2>&1 <<'PY'
import numpy as np
from iv2trt.output.writer import load_features
def rows(d):
    f, r = load_features(d); return {(x["id"], x["clip"]): v for v, x in zip(f, r)}
for a, b in (("/tmp/out_h_auto", "/tmp/out_h_auto_p1"), ("/tmp/out_h_auto", "/tmp/out_h_cpu"), ("/tmp/out_e_auto", "/tmp/out_e_cpu")):
    A, B = rows(a), rows(b)
    same = sorted(A) == sorted(B)
    cos = min(float(np.dot(A[k].astype(np.float64), B[k].astype(np.float64)) / np.linalg.norm(A[k].astype(np.float64)) / np.linalg.norm(B[k].astype(np.float64))) for k in A) if same else float("nan")
    print(a, b, "rows", len(A), len(B), "same keys", same, "min cos", cos)
PY
pack
timeout 150 python -m pytest -q -rA tests/test_pipelines_gpu.py -k "not ray" > $R/gpu_tests.log 2>&1
echo "tests rc=$?" >> $R/gpu.txt; pack
