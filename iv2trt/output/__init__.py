"""An output directory: sharded features with Parquet manifests, failures, job.json and summary.json, written
atomically (`writer`) and read back (`results`, the documented `iv2trt.load_features`)."""
