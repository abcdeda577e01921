"""Serving an exported artifact: chat templates, sampling, streaming generation (``Generator``), and the
OpenAI-compatible HTTP service (serve/server.py)."""

from .batch import Batch, GenerationResult, Sequence
from .generator import Generator, Stream
from .sampling import SamplingParams

__all__ = ["Batch", "GenerationResult", "Generator", "SamplingParams", "Sequence", "Stream"]
