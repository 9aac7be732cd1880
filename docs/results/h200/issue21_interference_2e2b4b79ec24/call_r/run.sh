#!/usr/bin/env bash
# device call R: what slows NVDEC when CPU work runs beside it. CPU scaling of decode/spin/memory copies alone;
# then the CLI's --decoder nvdec (2,400 clips) with 8 or 14 background processes of each kind at nice 10; then auto.
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/gpu.txt
which perf >> $R/gpu.txt 2>&1; cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list >> $R/gpu.txt 2>&1
T0=$(date +%s)
python -c "
import glob, os
from iv2trt.bench.pipeline import ensure_test_videos, VIDEO_CODECS
ps = ensure_test_videos('/tmp/h264', 16, VIDEO_CODECS['h264'], processes=16, footage=sorted(glob.glob('.footage/*')))
with open('/tmp/h264x30.csv', 'w') as f:
    f.write('path,id\n')
    for r in range(30):
        for p in ps: f.write(f'{os.path.abspath(p)},r{r}_{os.path.basename(p)}\n')
" >> $R/gpu.txt 2>&1
V=$(ls /tmp/h264/*.mp4 /tmp/h264/*.mkv 2>/dev/null | head -16); echo "videos: $(echo $V | wc -w) in $(( $(date +%s) - T0 )) s" >> $R/gpu.txt
# 1. scaling alone (nice 0)
for n in 1 4 8 12 16; do LOAD_SECONDS=7 python .devscripts/load.py decode $n 0 $V >> $R/scaling.txt 2>&1; done
for n in 1 8 16; do LOAD_SECONDS=4 python .devscripts/load.py spin $n 0 >> $R/scaling.txt 2>&1; done
for n in 1 4 8 16; do LOAD_SECONDS=4 python .devscripts/load.py mem $n 0 >> $R/scaling.txt 2>&1; done
pack
run() {  # name, load kind (none|decode|spin|mem), load count, -- extra args
  local name=$1 kind=$2 n=$3; shift 4
  local lp=""
  if [ "$kind" != none ]; then python .devscripts/load.py $kind $n 10 $V > $R/$name.load 2>&1 & lp=$!; sleep 1; fi
  vmstat 1 > $R/$name.vmstat & local vm=$!
  nvidia-smi dmon -s u -d 1 > $R/$name.dmon & local dm=$!
  local t=$(date +%s%N)
  timeout 100 python trt_inference.py --random-init --backend torch --inputs /tmp/h264x30.csv \
    --window-seconds 2 --output /tmp/out_$name --no-progress -v "$@" > $R/$name.log 2>&1
  echo "$name rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/gpu.txt
  [ -n "$lp" ] && { kill -TERM $lp; wait $lp; }
  kill $vm $dm 2>/dev/null
  cp /tmp/out_$name/summary.json $R/$name.summary.json 2>/dev/null; rm -rf /tmp/out_$name; pack
}
run nvdec none 0 -- --decoder nvdec
run nvdec_dec8 decode 8 -- --decoder nvdec
run nvdec_dec14 decode 14 -- --decoder nvdec
run nvdec_spin14 spin 14 -- --decoder nvdec
run nvdec_mem8 mem 8 -- --decoder nvdec
run auto none 0 -- --decoder auto
run auto_w14 none 0 -- --decoder auto --workers 14
run nvdec_again none 0 -- --decoder nvdec
echo "total $(( $(date +%s) - T0 )) s" >> $R/gpu.txt; pack
