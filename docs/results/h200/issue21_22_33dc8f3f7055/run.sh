#!/usr/bin/env bash
# device call 3: final figures at this code: H.264 auto 2p / 1p / cpu / nvdec, HEVC10 cpu / auto (2,400 clips each);
# runner start-up profile; GPU tests (pipelines, VP9 10/12-bit fixtures)
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
for name, ps in (('h264', ps), ('hevc', sorted(glob.glob(os.path.abspath('.hevc16/*.mp4'))))):
    with open(f'/tmp/{name}.csv', 'w') as f:
        f.write('path,id\n')
        for r in range(30):
            for p in ps: f.write(f'{os.path.abspath(p)},r{r}_{os.path.basename(p)}\n')
" >> $R/gpu.txt 2>&1
echo "videos made in $(( $(date +%s) - T0 )) s" >> $R/gpu.txt
timeout 90 python .devscripts/runner_profile.py > $R/runner_profile.txt 2>&1; pack
job() {  # name csv decoder extra...
  local n=$1 c=$2 d=$3; shift 3
  local t=$(date +%s%N)
  nvidia-smi dmon -s u -d 1 > $R/$n.dmon 2>&1 & local dm=$!
  timeout 120 python trt_inference.py --random-init --backend torch --inputs $c --window-seconds 2 \
    --decoder $d --output /tmp/out_$n --no-progress -v "$@" > $R/$n.log 2>&1
  echo "$n rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/gpu.txt; kill $dm 2>/dev/null
  cp /tmp/out_$n/summary.json $R/$n.summary.json 2>/dev/null
}
job h_auto /tmp/h264.csv auto
job h_auto_p1 /tmp/h264.csv auto --pipelines-per-gpu 1
job h_cpu /tmp/h264.csv cpu
job h_nvdec /tmp/h264.csv nvdec
pack
job e_cpu /tmp/hevc.csv cpu
job e_auto /tmp/hevc.csv auto
pack
python - > $R/compare.txt 2>&1 <<'PY'
import numpy as np
from iv2trt.output.writer import load_features
def rows(d):
    f, r = load_features(d); return {(x["id"], x["clip"]): v for v, x in zip(f, r)}
for a, b in (("/tmp/out_h_auto", "/tmp/out_h_auto_p1"), ("/tmp/out_h_auto", "/tmp/out_h_cpu"), ("/tmp/out_h_nvdec", "/tmp/out_h_cpu"), ("/tmp/out_e_auto", "/tmp/out_e_cpu")):
    A, B = rows(a), rows(b)
    same = sorted(A) == sorted(B)
    cos = min(float(np.dot(A[k].astype(np.float64), B[k].astype(np.float64)) / np.linalg.norm(A[k].astype(np.float64)) / np.linalg.norm(B[k].astype(np.float64))) for k in A) if same else float("nan")
    print(a, b, "rows", len(A), len(B), "same keys", same, "min cos", cos)
PY
pack
timeout 200 python -m pytest -q -rA tests/test_pipelines_gpu.py -k "not ray" tests/test_gpu_frames.py tests/test_nvdec_gpu.py -k "not ray and (vp9 or pipeline or killed or captures or shared)" > $R/gpu_tests.log 2>&1
echo "tests rc=$?" >> $R/gpu.txt; echo "total $(( $(date +%s) - T0 )) s" >> $R/gpu.txt; pack
