"""benchmark.py and the tools' measuring code: the encoder per backend, the pipeline per decoder, Ray scaling and
profiles. Nothing on the runtime path imports it."""
