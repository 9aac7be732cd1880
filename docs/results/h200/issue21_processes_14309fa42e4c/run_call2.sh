#!/usr/bin/env bash
# device call: is the NVDEC path bound by its process (GIL), the GPU or the decoders? nvdec/auto variants + py-spy
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
SPY=/tmp/site/py_spy-0.4.3.data/scripts/py-spy; chmod +x $SPY
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" > $R/gpu.txt
python -c "
import glob, os
from iv2trt.bench.pipeline import ensure_test_videos, VIDEO_CODECS
ps = ensure_test_videos('/tmp/h264', 16, VIDEO_CODECS['h264'], processes=8, footage=sorted(glob.glob('.footage/*')))
with open('/tmp/h264.csv', 'w') as f:
    f.write('path,id\n')
    for r in range(12):
        for p in ps: f.write(f'{os.path.abspath(p)},r{r}_{p.name}\n')
" >> $R/gpu.txt 2>&1
job() {  # name decoder extra...
  local n=$1 d=$2; shift 2
  nvidia-smi dmon -s u -d 1 > $R/$n.dmon 2>&1 & local dm=$!
  timeout 90 python trt_inference.py --random-init --backend torch --inputs /tmp/h264.csv --window-seconds 2 \
    --decoder $d --output /tmp/out_$n "$@" > $R/$n.log 2>&1
  echo "$n rc=$?" >> $R/gpu.txt; kill $dm 2>/dev/null
  cp /tmp/out_$n/summary.json $R/$n.summary.json 2>/dev/null
}
job nvdec8 nvdec
job nvdec16 nvdec --nvdec-sessions 16
job nvdec4 nvdec --nvdec-sessions 4
job nvdec_x2 nvdec --gpus 0,0
job auto auto
job auto_x2 auto --gpus 0,0
job auto_cpuresize auto --no-gpu-convert
pack
for d in nvdec auto; do
  timeout 100 $SPY record -r 250 --nonblocking --threads --gil -f raw -o $R/spy_${d}_gil.raw -- \
    python trt_inference.py --random-init --backend torch --inputs /tmp/h264.csv --window-seconds 2 --decoder $d \
    --output /tmp/out_spyg_$d > $R/spy_${d}_gil.log 2>&1
  timeout 100 $SPY record -r 250 --nonblocking --threads --idle -f raw -o $R/spy_${d}_all.raw -- \
    python trt_inference.py --random-init --backend torch --inputs /tmp/h264.csv --window-seconds 2 --decoder $d \
    --output /tmp/out_spya_$d > $R/spy_${d}_all.log 2>&1
  pack
done
