"""Train the built-in `tiny-trained` model (reference/tiny_trained/): a small CohereForCausalLM that has learned
Python's own documentation, so a bad quantization or a broken kernel shows up as worse text and perplexity, which
random weights cannot show.

    python tools/train_tiny_trained.py [--minutes M] [--out DIR]

- Corpus: ``reference.corpus.pydoc_text("train")`` (``pydoc_data.topics`` of the running CPython), one
  <BOS_TOKEN> before each topic; ``pydoc_text("heldout")`` (whole topics never trained on) measures perplexity.
- Tokenizer: a byte-level BPE of 3072 entries trained on the training text with tools/make_tiny_tokenizer.py's
  code, so the special tokens, their ids and the chat templates are those of the built-in `tiny` model.
- Model (the `tiny-trained` preset): 4 layers, hidden 256, 8 query heads sharing 2 kv heads, qk-norm, tied
  embeddings, logit_scale 0.0625 as Command-R and Aya have, so the fp16 and quantized paths see a real checkpoint's
  scale. With that scale a unit-variance tied embedding would start each token's logit for itself at 16 (0.0625 *
  256) and the loss near 14; embeddings of standard deviation 0.5 start it at 8 and the other logits at std 0.5:
  neither flat nor saturated.
- Training runs the reference model itself (reference/model.py); only its rotary embedding, an ONNX op with no
  autograd, is swapped for ``rotary_embedding_twin`` (the same interleaved rotation in differentiable torch ops)
  while training. AdamW, warm-up then cosine decay, random windows of 256 tokens, batches of 8 (more updates
  rather than bigger ones: a 2-core machine does about 20 a minute), 2 threads.

Reproducible: everything is seeded and the number of steps is fixed, ``--minutes`` times STEPS_PER_MINUTE (about
the rate of an idle 2-core machine; the shipped model's 200 steps took 30 minutes on a shared one), so the clock
never decides when training stops. The same torch, tokenizers and Python version give the same files.

Writes config.json, generation_config.json, model.safetensors (float16), tokenizer.json, tokenizer_config.json and
TRAINING.json (what was trained, how long, and the held-out perplexity of the float16 weights, computed in float32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: reference/ is imported from this checkout

import make_tiny_tokenizer  # noqa: E402  (tools/, this script's own folder)

import reference.model  # noqa: E402
from reference import load_checkpoint  # noqa: E402
from reference.config import CohereConfig  # noqa: E402
from reference.corpus import pydoc_text, pydoc_topics  # noqa: E402
from reference.model import CohereForCausalLM  # noqa: E402
from reference.presets import PRESETS  # noqa: E402
from reference.weights import save_checkpoint  # noqa: E402

log = logging.getLogger("train_tiny_trained")

SEED = 0
CONFIG = PRESETS["tiny-trained"].config  # the special-token ids of `tiny`, vocabulary 3072
SEQ_LEN = 256
EMBED_STD = 0.5
BATCH = 8
PEAK_LR = 3e-3
FINAL_LR_FRACTION = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
CLIP_NORM = 1.0
THREADS = 2
STEPS_PER_MINUTE = 20
DEFAULT_MINUTES = 10
EVAL_EVERY = 100
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "TRAINING.json")


def rotary_embedding_twin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
    """``reference.model.rotary_embedding`` in differentiable torch ops: pairs ``(x[2i], x[2i+1])`` of
    ``x [batch, heads, seq, head_dim]`` rotate by the angle whose cos and sin the tables hold at ``positions``."""
    c = cos[positions][:, None]  # [batch, 1, seq, head_dim // 2]
    s = sin[positions][:, None]
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)
    return rotated.to(x.dtype)


@contextlib.contextmanager
def differentiable_rotary():
    """The reference model with the twin rotation, for training only; the reference's own op comes back after."""
    original = reference.model.rotary_embedding
    reference.model.rotary_embedding = rotary_embedding_twin
    try:
        yield
    finally:
        reference.model.rotary_embedding = original


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream of ids: each text after its own <BOS_TOKEN>, as a document starts."""
    return torch.tensor([i for e in tokenizer.encode_batch(texts) for i in e.ids], dtype=torch.int64)


def init_model(config: CohereConfig, generator: torch.Generator) -> CohereForCausalLM:
    """Unit-variance embeddings (the output projection too: tied), 1/sqrt(fan_in) matrices, the projections into
    the residual stream scaled down by 1/sqrt(2 * layers) as GPT-2 does so the stream does not grow with depth,
    norm weights 1."""
    model = CohereForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=generator) * EMBED_STD)
            else:
                std = p.shape[-1] ** -0.5
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * config.num_hidden_layers)
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def learning_rate(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def perplexity(model: CohereForCausalLM, ids: torch.Tensor, window: int = SEQ_LEN) -> float:
    """exp of the mean next-token loss over ``ids``, cut into consecutive windows of ``window`` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = model(chunk[None, :-1])[0]
        total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def greedy(model: CohereForCausalLM, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tokenizer.decode(ids)


def train(model: CohereForCausalLM, ids: torch.Tensor, heldout: torch.Tensor, steps: int,
          generator: torch.Generator) -> float:
    """AdamW over random windows of ``ids``; weight decay on the matrices only (not embeddings or norms, as
    nanoGPT does). Returns the mean training loss of the last 20 steps."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "model.embed_tokens.weight"]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "model.embed_tokens.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR, betas=(0.9, 0.95))
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=generator)
        batch = torch.stack([ids[o:o + SEQ_LEN + 1] for o in offsets])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        model.train()
        with differentiable_rotary():
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        recent = (recent + [loss.item()])[-20:]
        if step % 20 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f lr %.2e %.0fs", step + 1, steps, loss.item(), learning_rate(step, steps),
                     time.perf_counter() - start)
        if (step + 1) % EVAL_EVERY == 0 and step + 1 < steps:
            model.eval()
            log.info("step %d: held-out perplexity %.1f", step + 1, perplexity(model, heldout))
    model.eval()
    return sum(recent) / len(recent)


def check_out(out: Path) -> None:
    """Only ever overwrite a folder this script wrote (it holds TRAINING.json) or an empty one."""
    if out.exists() and any(out.iterdir()) and not (out / "TRAINING.json").exists():
        raise SystemExit(f"{out} holds files this script did not write (no TRAINING.json); choose another --out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"training length: {STEPS_PER_MINUTE} steps a minute, the rate of a 2-core machine "
                             f"(default {DEFAULT_MINUTES})")
    parser.add_argument("--out", type=Path, default=REPO / "reference" / "tiny_trained")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    check_out(args.out)
    steps = max(1, round(args.minutes * STEPS_PER_MINUTE))

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    train_text = pydoc_text("train")
    tokenizer = make_tiny_tokenizer.build_tokenizer(train_text.splitlines(keepends=True), CONFIG.vocab_size)
    train_ids, heldout_ids = tokenize(tokenizer, pydoc_topics("train")), tokenize(tokenizer, pydoc_topics("heldout"))
    log.info("corpus: %d training tokens, %d held-out tokens; %d steps of %dx%d tokens", len(train_ids),
             len(heldout_ids), steps, BATCH, SEQ_LEN)

    model = init_model(CONFIG, generator)
    train_loss = train(model, train_ids, heldout_ids, steps, generator)
    seconds = time.perf_counter() - started

    make_tiny_tokenizer.write_tokenizer(tokenizer, args.out)
    save_checkpoint(model.half(), args.out)
    shipped, _ = load_checkpoint(args.out, torch.float32)  # the float16 weights as they ship, computed in float32
    heldout_ppl = perplexity(shipped, heldout_ids)
    report = {"seed": SEED, "steps": steps, "batch": BATCH, "seq_len": SEQ_LEN, "seconds": round(seconds, 1),
              "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
              "final_train_loss": round(train_loss, 4), "heldout_perplexity_fp32": round(heldout_ppl, 3),
              "python": sys.version.split()[0], "torch": torch.__version__}
    (args.out / "TRAINING.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("trained %d steps in %.0fs: train loss %.3f, held-out perplexity %.2f", steps, seconds, train_loss,
             heldout_ppl)
    log.info("greedy: %r", greedy(shipped, tokenizer, 'The "with" statement is used to', 48))
    log.info("wrote %s", ", ".join(str(args.out / name) for name in FILES))


if __name__ == "__main__":
    main()
