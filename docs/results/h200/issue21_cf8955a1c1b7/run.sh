#!/usr/bin/env bash
# device call F (final code): local x90 auto (pair for call G's Ray run), then the GPU tests
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/gpu.txt
git log --oneline -1 >> $R/gpu.txt 2>&1
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
t=$(date +%s%N)
timeout 150 python trt_inference.py --random-init --backend torch --inputs /tmp/h264x90.csv --window-seconds 2 \
  --decoder auto --output /tmp/out_local_x90 --no-progress -v > $R/local_x90.log 2>&1
echo "local_x90 rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/gpu.txt
cp /tmp/out_local_x90/summary.json $R/local_x90.summary.json 2>/dev/null; pack
T1=$(date +%s)
timeout 330 python -m pytest -q -rA -k "not ray" tests/test_pipelines_gpu.py tests/test_nvdec_gpu.py tests/test_gpu_frames.py \
  tests/test_uint8_pipeline.py tests/test_torch_compile.py tests/test_fused_ops.py > $R/gpu_tests.log 2>&1
echo "gpu tests rc=$? $(( $(date +%s) - T1 )) s" >> $R/gpu.txt
echo "total $(( $(date +%s) - T0 )) s" >> $R/gpu.txt; pack
