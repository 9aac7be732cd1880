"""The extraction job: its settings and identity (what must match to resume), the stages both executors call
(`stages`), the batcher and inference thread (`batching`), and the local executor (`local`)."""
