"""Fused Triton kernels, each beside its torch reference and a dispatcher."""
