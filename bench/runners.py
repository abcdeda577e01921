"""The runtimes under test, each behind one call: greedy-generate ``new_tokens`` for a batch of equal-length
prompts and say when each token came out.

* ``ours``: the ONNX Runtime CPU engine on the artifact, driven by ``engines.greedy.greedy``;
* ``serve``: the same engine through ``serve.Generator`` (tokenizer, sampler, detokenizer and stop checks included);
* ``reference``: the reference PyTorch model in eager mode, as an engine (``export.reference_engine``) on the same
  static KV cache shape, driven by the same loop;
* ``transformers``: HF ``CohereForCausalLM.generate``, fp32, greedy, the baseline users know.

Torch is imported by the runners that need it only: ``bench.worker`` times ``ours`` in a process whose resident
memory is measured.

Every runner starts its clock before allocating its KV cache, so time to first token includes it, as it does for
transformers (whose cache is created inside ``generate``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from engines.base import Engine
from engines.greedy import greedy


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


def _timed_greedy(engine: Engine, prompts: np.ndarray, new_tokens: int) -> Timing:
    """``engines.greedy.greedy`` with a clock: started before the engine allocates its cache, read per token."""
    rows = prompts.tolist()
    token_times: list[float] = []
    started = time.perf_counter()
    greedy(engine, rows, new_tokens, on_token=lambda tokens: token_times.append(time.perf_counter()))
    return Timing.from_token_times(started, token_times)


class Ours:
    name = "ours"

    def __init__(self, artifact: Path):
        from engines import Artifact, open_engine

        self.engine = open_engine(Artifact.open(artifact), "onnxruntime-cpu")

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        return _timed_greedy(self.engine, prompts, new_tokens)


class Serve:
    name = "serve"

    def __init__(self, artifact: Path):
        from serve import Generator

        # Without the prefix cache: every repeat sends the same prompts, which would then skip their prefill.
        self.generator = Generator(artifact, backend="onnxruntime-cpu", prefix_cache_mb=0)

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        results = self.generator.generate([row.tolist() for row in prompts], max_new_tokens=new_tokens,
                                          temperature=0)
        # Every row advances in the same engine steps; row 0 speaks for the batch. A random model may emit its
        # eos token and stop early: the rate is then over the steps it did run.
        first = results[0]
        steps = first.completion_tokens - 1
        decode_s = steps / first.decode_tokens_per_s if first.decode_tokens_per_s else 0.0
        return Timing(ttft_s=first.time_to_first_token_s, decode_s=decode_s, decode_steps=max(steps, 1))


class Reference:
    name = "reference"

    def __init__(self, checkpoint: Path, max_batch: int, max_context: int):
        import torch

        from export.reference_engine import ReferenceEngine

        self.engine = ReferenceEngine.load(checkpoint, max_batch, max_context, torch.float32)

    def run(self, prompts: np.ndarray, new_tokens: int) -> Timing:
        return _timed_greedy(self.engine, prompts, new_tokens)


class Transformers:
    name = "transformers"

    def __init__(self, checkpoint: Path):
        import torch
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
        import torch

        clock = self._clock_class()
        input_ids = torch.from_numpy(prompts)
        started = time.perf_counter()
        with torch.inference_mode():
            # min_new_tokens masks eos until the end, so every runtime generates exactly new_tokens.
            self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=[clock],
                                pad_token_id=self.model.config.pad_token_id)
        return Timing.from_token_times(started, clock.times)
