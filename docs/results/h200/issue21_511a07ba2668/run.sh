#!/usr/bin/env bash
# device call P: benchmark.py's combined-decoding target as the CLI runs the job (cpu, nvdec, auto; 7,200 clips each)
set -u
bash .devwheels/install.sh >/dev/null && export PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar czf results.tgz r); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
python -c "from iv2trt.bench.main import source_digest; print(source_digest())" >> $R/gpu.txt
T0=$(date +%s)
vmstat 1 > $R/bench.vmstat & VM=$!
nvidia-smi dmon -s u -d 1 > $R/bench.dmon & DM=$!
timeout 470 python benchmark.py --skip-encoder --pipeline --footage .footage --num-videos 16 --window-seconds 2 \
  --executor-gpus 1 --executor-decoders cpu nvdec auto --executor-repeat 90 --output-dir $R/bench > $R/bench.log 2>&1
echo "bench rc=$? $(( $(date +%s) - T0 )) s" >> $R/gpu.txt
kill $VM $DM 2>/dev/null; pack
if [ $(( $(date +%s) - T0 )) -lt 440 ]; then
  timeout $(( 530 - ($(date +%s) - T0) )) python -m pytest -q -rA tests/test_pipelines_gpu.py -k "not ray" > $R/gpu_tests.log 2>&1
  echo "gpu tests rc=$? $(( $(date +%s) - T0 )) s" >> $R/gpu.txt
fi
pack
