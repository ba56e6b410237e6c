"""Packed weight formats, their pure-torch reference (also the CPU path) and Triton kernels (GPU path)."""
