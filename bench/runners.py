"""The runtimes under test, each behind one call: greedy-generate ``new_tokens`` for a batch of equal-length
prompts and say when each token came out.

* ``ours``: the ONNX Runtime CPU engine on the artifact, driven step by step as ``export.parity.greedy`` does;
* ``serve``: the same engine through ``serve.Generator`` (tokenizer, sampler, detokenizer and stop checks included);
* ``reference``: the reference PyTorch model in eager mode, on the same static KV cache shape;
* ``transformers``: HF ``CohereForCausalLM.generate``, fp32, greedy, the baseline users know.

Every runner starts its clock before allocating its KV cache, so time to first token includes it, as it does for
transformers (whose cache is created inside ``generate``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Timing:
    ttft_s: float  # start to the first token (prefill of the whole prompt)
    decode_s: float  # first token to last token
    decode_steps: int  # tokens after the first, per row

    @classmethod
    def from_token_times(cls, started: float, token_times: list[float]) -> "Timing":
        return cls(ttft_s=token_times[0] - started, decode_s=token_times[-1] - token_times[0],
                   decode_steps=len(token_times) - 1)

    @property
    def step_s(self) -> float:
        return self.decode_s / self.decode_steps


def _timed_greedy(step, new_state, prompts: np.ndarray, new_tokens: int) -> Timing:
    """Greedy generation on a static-cache step function ``step(state, ids, write_indices, logits_indices)``."""
    batch, length = prompts.shape
    zeros = np.zeros(batch, np.int64)
    started = time.perf_counter()
    state = new_state(batch)
    tokens = step(state, prompts, zeros, np.full(batch, length - 1, np.int64)).argmax(-1)
    token_times = [time.perf_counter()]
    for position in range(length, length + new_tokens - 1):
        tokens = step(state, tokens[:, None].astype(np.int64), np.full(batch, position, np.int64), zeros).argmax(-1)
        token_times.append(time.perf_counter())
    return Timing.from_token_times(started, token_times)


class Ours:
    name = "ours"

    def __init__(self, artifact: Path):
        from engines import Artifact, open_engine

        self.engine = open_engine(Artifact.open(artifact), "onnxruntime-cpu")

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        return _timed_greedy(self.engine.step, self.engine.allocate, prompts, new_tokens)


class Serve:
    name = "serve"

    def __init__(self, artifact: Path, generator_class):
        self.generator = generator_class(artifact, backend="onnxruntime-cpu")

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        results = self.generator.generate([row.tolist() for row in prompts], max_new_tokens=new_tokens,
                                          temperature=0)
        # Every row advances in the same engine steps; row 0 speaks for the batch. A random model may emit its
        # eos token and stop early: the rate is then over the steps it did run.
        first = results[0]
        steps = first.completion_tokens - 1
        decode_s = steps / first.decode_tokens_per_s if first.decode_tokens_per_s else 0.0
        return Timing(ttft_s=first.time_to_first_token_s, decode_s=decode_s, decode_steps=max(steps, 1))


def serve_generator_class():
    """``serve.Generator`` if the serve package provides it; None (and why, logged) if not."""
    try:
        import serve

        return serve.Generator
    except Exception as e:  # serve/ is being written concurrently: anything it raises means "not there yet"
        log.warning("not benchmarking serve.Generator: %s: %s", type(e).__name__, e)
        return None


class Reference:
    name = "reference"

    def __init__(self, checkpoint: Path, max_context: int):
        from reference import load_model

        self.model, _ = load_model(checkpoint, torch.float32)
        self.max_context = max_context

    def _step(self, caches, input_ids, write_indices, logits_indices):
        with torch.inference_mode():
            logits, _ = self.model(torch.from_numpy(input_ids), torch.from_numpy(write_indices),
                                   torch.from_numpy(logits_indices), caches)
        return logits.numpy()

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        return _timed_greedy(self._step, lambda batch: self.model.new_caches(batch, self.max_context), prompts,
                             new_tokens)


class Transformers:
    name = "transformers"

    def __init__(self, checkpoint: Path):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # a progress bar per load clutters the benchmark's log
        self.model = transformers.CohereForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

        class Clock(transformers.LogitsProcessor):
            """Called once per generated token, right after the forward that produced its logits."""

            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        self._clock_class = Clock

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        clock = self._clock_class()
        input_ids = torch.from_numpy(prompts)
        started = time.perf_counter()
        with torch.inference_mode():
            # min_new_tokens masks eos until the end, so every runtime generates exactly new_tokens.
            self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=[clock],
                                pad_token_id=self.model.config.pad_token_id)
        return Timing.from_token_times(started, clock.times)
