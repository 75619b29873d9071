"""Triton kernels (flash attention, RMSNorm) with PyTorch autograd wrappers."""
