"""Triton kernels, one module per op. Imported lazily by rlhf_ext.ops so that
rlhf_ext works without triton installed."""
