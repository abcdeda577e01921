"""``python -m export``: turn a Cohere checkpoint into a verified, self-describing artifact folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.cli import configure_logging
from reference import PRESETS, CheckpointError, ConfigError, ModelNotFoundError
from reference.presets import DEFAULT_MODEL

from .build import ENGINES, ExportError, ExportOptions, build


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
               "  python -m export --model /data/c4ai-command-r-v01 --max-context 8192\n\n"
               f"presets: {', '.join(PRESETS)}\n"
               "Hub downloads honour HF_HOME, HF_TOKEN and HF_HUB_OFFLINE=1.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"preset name, local checkpoint folder, or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--out", type=Path, help="artifact folder to write (default: build/<model>-<dtype>)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float32",
                        help="float16: the GPU artifact (TensorRT, CUDA); float32: fast on ONNX Runtime CPU "
                             "(default: float32)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch the engines accept (default: 8)")
    parser.add_argument("--max-context", type=int, default=2048,
                        help="tokens per sequence, prompt plus generation; sizes the static KV cache "
                             "(default: 2048)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="onnx: ONNX only; tensorrt: also build a TensorRT plan; auto: TensorRT too when it "
                             "can run here (default: auto)")
    parser.add_argument("--skip-verify", action="store_true",
                        help="do not measure parity against the reference (recorded in the manifest)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose, ("reference", "export", "engines", "serve"))
    opts = ExportOptions(model=args.model, out=args.out, dtype=args.dtype, max_batch=args.max_batch,
                         max_context=args.max_context, engine=args.engine, verify=not args.skip_verify)
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
