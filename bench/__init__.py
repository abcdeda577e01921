"""Benchmark: our ONNX Runtime engine against the reference model, HF transformers and the memory-bandwidth limit.

Run it with ``python -m bench`` (see ``bench/__main__.py``).
"""
