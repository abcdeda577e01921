"""Serving an exported artifact: chat templates, sampling, streaming generation (``Generator``)."""

from .generator import Batch, GenerationResult, Generator, SamplingParams, Sequence, Stream

__all__ = ["Batch", "GenerationResult", "Generator", "SamplingParams", "Sequence", "Stream"]
