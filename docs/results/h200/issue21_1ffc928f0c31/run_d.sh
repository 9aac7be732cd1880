#!/usr/bin/env bash
# device call D: local x90 auto with py-spy on a pipeline process (where its threads' time goes), then call E right after
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/gpu.txt
PYSPY=/tmp/site/py_spy-0.4.3.data/scripts/py-spy; chmod +x $PYSPY; echo "py-spy: $PYSPY" >> $R/gpu.txt
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
  --decoder auto --output /tmp/out_local_x90 --no-progress -v > $R/local_x90.log 2>&1 &
JOB=$!
for i in $(seq 60); do grep -q "inputs found" $R/local_x90.log && break; sleep 1; done
sleep 8
P=$(ps -eo pid,pcpu,cmd --sort=-pcpu | grep "spawn_main" | grep -v grep | head -1 | awk "{print \$1}")
ps -o pid,ppid,pcpu,nlwp,cmd -p $P >> $R/gpu.txt 2>&1
timeout 30 $PYSPY record -d 12 -r 100 --threads --nonblocking --format raw -o $R/local_pipeline.raw --pid $P > $R/pyspy_local.txt 2>&1
top -b -n 1 -w 200 | head -40 > $R/top_local.txt
wait $JOB; echo "local_x90 rc=$? wall_ms $(( ($(date +%s%N) - t) / 1000000 ))" >> $R/gpu.txt
cp /tmp/out_local_x90/summary.json $R/local_x90.summary.json 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s" >> $R/gpu.txt; pack
