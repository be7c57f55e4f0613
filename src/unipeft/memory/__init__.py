"""Frozen weights that wait in host memory: the input embedding table (host_embedding.py) and quantized layers
streamed to the accelerator one at a time (stream.py)."""
