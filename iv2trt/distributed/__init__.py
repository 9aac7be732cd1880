"""The Ray executor (`trt_inference.py --ray`): the driver (`ray_job`), what runs on the cluster (`ray_stages`) and
the partitions that make its output exactly-once (`partitions`)."""
