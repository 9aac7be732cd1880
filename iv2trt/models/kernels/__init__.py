"""The fused fp16 path's own GPU kernels, apart from the model that reads like the paper: Triton kernels, quack's
GEMMs with the norms in their epilogues, FlashAttention-4, which of them serves a model (`fused_ops`), their
switches and caches (`switches`)."""
