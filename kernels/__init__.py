"""Triton kernels of transmatcher_fast, installed as ``transmatcher_fast.kernels``."""
