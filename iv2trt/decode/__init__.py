"""Inputs -> clips of uint8 frames: finding the inputs (`inputs`), planning which frames make each clip (`clips`),
reading them on the CPU with PyAV (`pyav`, `source`) or on the GPU with NVDEC (`nvdec`, `colorspace`), the
decode workers that run either beside the job (`workers`) and the choice between them (`plan`)."""
