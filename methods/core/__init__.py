"""Shared quantization primitives; every method composes these."""
