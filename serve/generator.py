"""Text generation on an artifact: tokenize, run the engine step by step, sample, detokenize, stop.

    gen = Generator("build/tiny-float32")
    gen.generate("Hello", max_new_tokens=20).text
    for piece in (s := gen.stream("Hello", temperature=0.7, seed=1)):
        print(piece, end="")
    s.result.finish_reason

The per-step core (``Sequence``, ``Batch``) is in serve/batch.py, sampling in serve/sampling.py; the HTTP server's
scheduler drives the same core with continuous batching.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer

from engines import Artifact, ArtifactError, open_engine

from . import replies, tokens
from .batch import Batch, GenerationResult, Sequence
from .chat import ChatTemplateError, ChatTemplates
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, defaults_from_generation_config
from .tokens import ContentSplitter, check_text, most_characters

log = logging.getLogger(__name__)

END_OF_TURN = "<|END_OF_TURN_TOKEN|>"
# The prefix cache's default size, on the engine's device: 256 MB hold 1,600 tokens of Command R 08-2024 (40 layers,
# 8 kv heads of 128, fp16: 160 KB a token), 10,000 of the 100m benchmark model's. --prefix-cache-mb sets it.
DEFAULT_PREFIX_CACHE_MB = 256


class Stream:
    """Iterate for the text pieces of one request as they are decoded; ``result`` once the iteration is over."""

    def __init__(self, pieces: Iterator[str], seq: Sequence):
        self._pieces = pieces
        self._seq = seq

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    @property
    def result(self) -> GenerationResult:
        if not self._seq.finished:
            raise RuntimeError("the stream has not been read to its end")
        return self._seq.result()


Prompt = str | list[int]


class Generator:
    """Generation on one artifact folder. Each call allocates its own cache state, so calls from several threads
    may run at once (without batching them together: that is the scheduler's job, built on ``Batch``).

    ``split_special_tokens``: encode chat content (messages, tools, documents) with its special tokens as plain
    text, so a user cannot write the template's control tokens (as OpenAI treats such text). Off by default:
    content like ``<|START_OF_TURN_TOKEN|>`` then becomes the control token, as in transformers, vLLM and TGI.
    See serve/tokens.py.

    ``prefix_cache_mb``: the size of the prefix cache (serve/prefix_cache.py) shared by every call and the HTTP
    scheduler; 0 turns it off. On by default, as vLLM's: a reused prefix's KV is the KV its prefill would write, so
    greedy output is the same with and without it (tests/test_prefix_cache.py).
    """

    def __init__(self, artifacts: str | Path, backend: str = "auto", split_special_tokens: bool = False,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB):
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb {prefix_cache_mb}: must be >= 0 (0 turns the prefix cache off)")
        prefix_cache_bytes = int(prefix_cache_mb * 2 ** 20)
        self.artifact = Artifact.open(artifacts)
        self.spec = self.artifact.spec
        self.engine = open_engine(self.artifact, backend)
        self.backend = self.engine.backend
        self._check_memory(prefix_cache_bytes)
        self.tokenizer = Tokenizer.from_file(str(self.artifact.path("tokenizer.json")))
        tokenizer_config = self._json("tokenizer_config.json")
        # A base checkpoint has no chat template: it still generates text; only chat() needs one.
        self.templates = (ChatTemplates.from_tokenizer_config(tokenizer_config)
                          if tokenizer_config.get("chat_template") is not None else None)
        self.splitter = ContentSplitter(self.tokenizer) if split_special_tokens else None
        # A text longer than this cannot fit the context: refused before tokenizing it (which takes seconds for MBs).
        self.max_prompt_characters = most_characters(self.tokenizer, self.spec.max_context)
        generation_config = self._json("generation_config.json")
        self.defaults = defaults_from_generation_config(generation_config)
        try:
            self.defaults.validate(self.spec.vocab_size)
        except ValueError as e:
            raise ArtifactError(f"{self.artifact.path('generation_config.json')}: {e}") from None
        self.stop_token_ids = frozenset(self._stop_token_ids(generation_config))
        model_config = self.artifact.manifest.config
        pad = generation_config.get("pad_token_id", model_config.get("pad_token_id"))
        self.pad_token_id = pad if isinstance(pad, int) and 0 <= pad < self.spec.vocab_size else 0
        self.prefix_cache = PrefixCache(self.spec.bytes_per_slot, prefix_cache_bytes) if prefix_cache_bytes else None
        log.info("loaded %s on %s (max_batch %d, max_context %d, prefix cache %s MB)", self.artifact.folder,
                 self.backend, self.spec.max_batch, self.spec.max_context, prefix_cache_mb)

    def _check_memory(self, prefix_cache_bytes: int) -> None:
        """The artifact's memory plan, checked again where it runs: its KV cache of max_batch rows (allocated whole by
        the HTTP scheduler) and the prefix cache's limit must fit beside the weights the engine has just loaded."""
        device = "cpu" if self.backend == "onnxruntime-cpu" else "cuda"
        plan = self.artifact.manifest.memory.on_loaded_device(device)
        if plan is not None:
            plan = dataclasses.replace(plan, budget_bytes=plan.budget_bytes - prefix_cache_bytes)
        refusal = plan and plan.refusal()
        if refusal:
            self.engine.close()
            raise ArtifactError(f"{self.artifact.folder} does not fit on {device} now: {refusal}, the prefix cache's "
                                f"{prefix_cache_bytes / 2**20:.0f} MiB set aside. Re-export with those flags, lower "
                                "prefix_cache_mb (--prefix-cache-mb), or free memory")

    def _json(self, name: str) -> dict:
        path = self.artifact.path(name)
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON ({e})") from None

    def _stop_token_ids(self, generation_config: dict) -> set[int]:
        eos = generation_config.get("eos_token_id", self.artifact.manifest.config.get("eos_token_id"))
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        end_of_turn = self.tokenizer.token_to_id(END_OF_TURN)
        if end_of_turn is not None:
            ids.add(end_of_turn)
        if not ids:
            log.warning("%s names no eos token: generation stops only at max_new_tokens or a stop string",
                        self.artifact.folder)
        return ids

    # --- prompts

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = True, citation_mode: str = "accurate") -> str | list[int]:
        """The prompt transformers' ``apply_chat_template`` renders, or its token ids with ``tokenize`` (with
        ``split_special_tokens``, special tokens in the content are plain text in the ids)."""
        if self.templates is None:
            raise ChatTemplateError(f"{self.artifact.path('tokenizer_config.json')} has no chat_template (a base "
                                    "checkpoint?): chat needs one; plain text generation works without")
        split = tokenize and self.splitter is not None
        if split:
            messages, tools, documents = (self.splitter.escape(messages), self.splitter.escape(tools),
                                          self.splitter.escape(documents))
        text = self.templates.render(messages, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, citation_mode=citation_mode)
        if not tokenize:
            return text
        self._check_length(text, "the rendered conversation")
        if split:
            return self.splitter.encode(text)
        # The template already starts with BOS: adding special tokens again would double it.
        return tokens.tokenize(self.tokenizer, [text], add_special_tokens=False)[0]

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string is tokenized as transformers' ``tokenizer(prompt)`` does (BOS first);
        token ids are checked against the vocabulary and the artifact's max_context."""
        if isinstance(prompt, str):
            self._check_length(prompt, "prompt")
            ids = tokens.tokenize(self.tokenizer, [prompt], add_special_tokens=True)[0] if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.spec.vocab_size})")
        else:
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.spec.max_context:
            raise ValueError(f"prompt has {len(ids)} tokens; the artifact's max_context is {self.spec.max_context} "
                             "tokens (prompt plus reply), which leaves no room to generate. Shorten the prompt or "
                             "export with a larger --max-context.")
        return ids

    def _check_length(self, text: str, what: str) -> None:
        """Refuse, before tokenizing, a text too long to fit the context whatever its tokens, or not valid Unicode."""
        if len(text) > self.max_prompt_characters:
            raise ValueError(f"{what} has {len(text)} characters: more than {self.max_prompt_characters}, so more "
                             f"tokens than the artifact's max_context of {self.spec.max_context} tokens. Shorten it.")
        check_text(text, what)

    def sampling(self, **overrides) -> SamplingParams:
        """The checkpoint's defaults with ``overrides``, validated."""
        known = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
        params = dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})
        params.validate(self.spec.vocab_size)
        return params

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, started: float | None = None) -> Sequence:
        return Sequence(prompt_ids, params, self.stop_token_ids | set(params.stop_token_ids), self.tokenizer,
                        self.spec.max_context, self.spec.vocab_size, started)

    # --- generation

    def generate(self, prompt: Prompt | list[Prompt], **sampling) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (string or token ids) or a list of them. A list runs as one batch through the
        engine; a list longer than the artifact's max_batch runs in consecutive batches of max_batch. Each
        result equals what its prompt gives alone (with the same seed)."""
        started = time.perf_counter()
        single = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt) and all(
            isinstance(t, numbers.Integral) for t in prompt))
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompt is empty" if isinstance(prompts, (list, tuple)) else
                             f"prompt: expected a string, token ids or a list of them, got {type(prompt).__name__}")
        params = self.sampling(**sampling)
        results = self._run([self.encode(p) for p in prompts], params, started)
        return results[0] if single else results

    def _run(self, prompts: list[list[int]], params: SamplingParams, started: float) -> list[GenerationResult]:
        sequences = [self.new_sequence(ids, params, started) for ids in prompts]
        for first in range(0, len(sequences), self.spec.max_batch):
            chunk = sequences[first:first + self.spec.max_batch]
            batch = Batch(self.engine, len(chunk), self.pad_token_id, prefix_cache=self.prefix_cache)
            for seq in chunk:
                batch.add(seq)
            while batch.live:
                batch.step()
        return [seq.result() for seq in sequences]

    def stream(self, prompt: Prompt, **sampling) -> Stream:
        """Generate for one prompt, yielding text pieces as they are decoded; the returned Stream's ``result``
        holds the whole result once iterated. Bad input raises here, before anything is computed or yielded."""
        started = time.perf_counter()
        params = self.sampling(**sampling)
        seq = self.new_sequence(self.encode(prompt), params, started)

        def pieces() -> Iterator[str]:
            batch = Batch(self.engine, 1, self.pad_token_id, prefix_cache=self.prefix_cache)
            batch.add(seq)
            while batch.live:
                batch.step()
                piece = seq.take_text()
                if piece:
                    yield piece

        return Stream(pieces(), seq)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, documents: list[dict] | None = None,
             citation_mode: str = "accurate", **sampling) -> GenerationResult:
        """Render the conversation with the chat template and generate the assistant's reply. With ``tools`` the
        reply's tool calls are parsed into ``result.tool_calls``; with ``documents`` its citations into
        ``result.grounded_answer`` (both keep the raw text and an ``error`` when the model's output is malformed)."""
        started = time.perf_counter()
        params = self.sampling(**sampling)  # before rendering: bad parameters are reported first, and cheaply
        ids = self.apply_chat_template(messages, tools=tools, documents=documents, tokenize=True,
                                       citation_mode=citation_mode)
        [result] = self._run([self.encode(ids)], params, started)
        return replies.parse(result, tools=tools is not None, documents=documents is not None)
