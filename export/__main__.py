"""``python -m export``: turn a Cohere checkpoint into a verified, self-describing artifact folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.cli import configure_logging
from reference import PRESETS, CheckpointError, ConfigError, ModelNotFoundError
from reference.presets import DEFAULT_MODEL
from reference.quantize import BLOCK_SIZES

from .build import ENGINES, ORT_ACCURACY_LEVELS, QUANTIZE_MODES, ExportError, ExportOptions, build


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a Cohere Command-R family checkpoint (CohereForCausalLM) to an artifact folder:\n"
                    "an ONNX decoder graph with a static KV cache, optionally an fp16 TensorRT engine, the\n"
                    "tokenizer and chat templates, and manifest.json with checksums and measured parity.",
        epilog="examples:\n"
               "  python -m export                                 # the built-in tiny model, no download\n"
               "  python -m export --model command-r --dtype float16 --engine tensorrt\n"
               "  python -m export --model /data/c4ai-command-r-v01 --max-context 8192\n"
               "  python -m export --model tiny --quantize int4         # 4-bit weights, ONNX Runtime CPU\n\n"
               f"presets: {', '.join(PRESETS)}\n"
               "Hub downloads honour HF_HOME, HF_TOKEN and HF_HUB_OFFLINE=1.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"preset name, local checkpoint folder, or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--out", type=Path, help="artifact folder to write (default: build/<model>-<dtype>)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float32",
                        help="float16: the GPU artifact (TensorRT, CUDA); float32: fast on ONNX Runtime CPU "
                             "(default: float32)")
    parser.add_argument("--max-batch", type=_max_batch, default=8,
                        help="largest batch the engines accept, or 'auto': the most rows of --max-context tokens "
                             "that fit the memory budget (default: 8)")
    parser.add_argument("--max-context", type=int, default=2048,
                        help="tokens per sequence, prompt plus generation; sizes the static KV cache "
                             "(default: 2048)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="onnx: ONNX only; tensorrt: also build a TensorRT plan; auto: TensorRT too when it "
                             "can run here (default: auto)")
    parser.add_argument("--memory-budget", type=_bytes, metavar="SIZE",
                        help="memory the artifact may use where it runs, e.g. 80GB or 24GiB: GPU memory for "
                             "TensorRT or ONNX Runtime CUDA, host memory for CPU (default: the device's free memory "
                             "less 10%%). Export refuses a plan over it before any work and says what fits")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES,
                        help="weight-only quantization of the attention, MLP and output projections: int8 halves "
                             "fp16 weights, int4 quarters them (embedding lookup and norms stay in --dtype). "
                             "Verified against the same dequantized weights, and for quality against the "
                             "unquantized model (default: none)")
    parser.add_argument("--block-size", type=int, choices=BLOCK_SIZES,
                        help="inputs sharing one scale: smaller is more accurate and a little larger "
                             "(default: 32 for int4, 128 for int8)")
    parser.add_argument("--ort-accuracy-level", type=int, choices=ORT_ACCURACY_LEVELS, default=4,
                        help="ONNX Runtime CPU, quantized artifacts: 4 quantizes activations to int8 inside the "
                             "quantized matmuls (about 3x faster than fp32 weights), 1 keeps them in fp32 (exact, "
                             "slower; int8 weights at level 1 are slower than fp32). Recorded in the manifest "
                             "(default: 4)")
    parser.add_argument("--skip-verify", action="store_true",
                        help="do not measure parity against the reference (recorded in the manifest)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def _bytes(text: str) -> int:
    """A size such as ``80GB``, ``24GiB`` or ``1500000000``."""
    number = text.rstrip("KMGTBkmgtibIB ")
    unit = text[len(number):].strip().upper()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 80GB, 24GiB or a number of bytes"
                                         ) from None
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive size")
    return int(value)


def _max_batch(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of rows or 'auto'") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose, ("reference", "export", "engines", "serve"))
    opts = ExportOptions(model=args.model, out=args.out, dtype=args.dtype, max_batch=args.max_batch,
                         max_context=args.max_context, engine=args.engine, verify=not args.skip_verify,
                         memory_budget=args.memory_budget, quantize=args.quantize, block_size=args.block_size,
                         ort_accuracy_level=args.ort_accuracy_level)
    try:
        out = build(opts)
    except (ExportError, ConfigError, CheckpointError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: the temporary folder is already removed
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"artifact: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
