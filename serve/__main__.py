"""``python -m serve``: generate text from an exported artifact folder, from the command line.

One command, no subcommands: what to do follows from the arguments (a PROMPT completes it, ``--chat`` starts a
conversation, ``--port`` starts the OpenAI-compatible HTTP server, whose defaults the sampling flags set).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from engines import BACKENDS, ArtifactError, EngineError
from engines.cli import configure_logging

from .generator import DEFAULT_PREFIX_CACHE_MB, Generator
from .sampling import SamplingParams

# Where --api-key is read from when not given: the environment keeps a secret out of the process list.
API_KEY_ENV = "COHERE_DEPLOY_API_KEY"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line a newcomer can act on, instead of argparse's usage block.
        self.exit(2, f"error: {message} (see python -m serve --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text with an artifact folder written by `python -m export`.\n"
                    "Give a PROMPT to continue it as raw text, or --chat to talk to the model with its chat\n"
                    "template; the reply is printed as it is generated.",
        epilog="examples:\n"
               "  python -m serve build/tiny-float32 \"The capital of France is\"\n"
               "  python -m serve build/command-r-float16 --chat --temperature 0.3\n"
               "  python -m serve build/tiny-float32 \"Once upon a time\" --temperature 0.8 --top-p 0.9 --seed 1\n"
               "  python -m serve build/tiny-float32 --port 8000      # HTTP server on 127.0.0.1:8000\n\n"
               "In --chat, type a message and press enter; /exit or end of input (Ctrl-D) quits.\n"
               "Sampling defaults come from the artifact's generation_config.json (greedy when it says nothing).")
    parser.add_argument("artifact", metavar="ARTIFACTS", help="artifact folder written by `python -m export`")
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="text to continue (not with --chat)")
    parser.add_argument("--chat", action="store_true", help="interactive conversation using the chat template")
    http = parser.add_argument_group("HTTP server (OpenAI-compatible; see serve/server.py)")
    http.add_argument("--port", type=int, metavar="PORT", help="serve HTTP on this port instead of generating once")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default: 127.0.0.1, this machine only); 0.0.0.0 for all")
    http.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV),
                      help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})")
    parser.add_argument("--split-special-tokens", action="store_true",
                        help="encode chat content as plain text even where it spells a special token such as "
                             "<|START_OF_TURN_TOKEN|> (as OpenAI does); by default such text becomes the control "
                             "token, as in transformers, vLLM and TGI")
    parser.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                        help="memory, on the engine's device, for the KV of prompt prefixes seen before, reused "
                             f"instead of prefilled again (as vLLM's automatic prefix caching); 0 turns it off "
                             f"(default: {DEFAULT_PREFIX_CACHE_MB})")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="engine: auto picks TensorRT when the artifact has a plan this machine can run, "
                             "else ONNX Runtime on CUDA, else on CPU (default: auto)")
    sampling = parser.add_argument_group("sampling (default: the artifact's generation_config.json)")
    sampling.add_argument("--temperature", metavar="T", type=float, help="0 is greedy; higher is more random")
    sampling.add_argument("--top-p", metavar="P", type=float,
                          help="sample from the most likely tokens holding this much probability, in (0, 1]")
    sampling.add_argument("--top-k", metavar="K", type=int,
                          help="sample from the K most likely tokens; 0 switches it off")
    sampling.add_argument("--min-p", metavar="P", type=float,
                          help="drop tokens less likely than this fraction of the most likely one, in [0, 1]")
    sampling.add_argument("--repetition-penalty", metavar="R", type=float,
                          help="> 1 discourages repeating tokens; 1 is off")
    sampling.add_argument("--max-new-tokens", metavar="N", type=int, help="most tokens to generate per reply")
    sampling.add_argument("--seed", metavar="N", type=int, help="makes sampling repeatable")
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="stop when the reply contains TEXT (not printed); may be repeated")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # intermixed: flags may come before, between or after ARTIFACTS and PROMPT
    args = parser.parse_intermixed_args(argv)
    if args.port is not None:
        if args.chat or args.prompt is not None:
            parser.error("--port starts the HTTP server: give no PROMPT and no --chat with it")
        if not 0 <= args.port <= 65535:
            parser.error(f"--port {args.port}: must lie in [0, 65535]")
        if args.api_key is not None and not args.api_key.strip():
            # Empty would silently serve without authentication: the operator meant to set a key.
            parser.error(f"the API key is empty (--api-key or ${API_KEY_ENV}): give a key, or unset it to serve "
                         "without one")
    elif args.chat == (args.prompt is not None):
        parser.error("give a PROMPT to complete, or --chat for a conversation (not both)")
    if args.prompt == "":
        parser.error("PROMPT is empty")
    if not args.prefix_cache_mb >= 0:  # also refuses nan
        parser.error(f"--prefix-cache-mb {args.prefix_cache_mb}: must be >= 0 (0 turns the prefix cache off)")
    try:  # the flags alone, before the (possibly long) checksum of a large artifact
        SamplingParams(**_given(args)).validate()
    except ValueError as e:
        parser.error(str(e))
    return args


_FLAG_NAMES = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "seed", "stop")


def _given(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _FLAG_NAMES if getattr(args, name) is not None}


def _print_stream(generator: Generator, prompt, sampling: dict) -> str:
    stream = generator.stream(prompt, **sampling)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    return stream.result.text


def _chat(generator: Generator, sampling: dict) -> None:
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":  # "" is end of input
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        prompt = generator.apply_chat_template(history, tokenize=True)
        reply = _print_stream(generator, prompt, sampling)
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose, ("engines", "serve"), level=logging.WARNING)
    sampling = _given(args)
    try:
        generator = Generator(args.artifact, backend=args.backend, split_special_tokens=args.split_special_tokens,
                              prefix_cache_mb=args.prefix_cache_mb)
        if args.port is not None:
            from .server import serve  # here: the one-shot CLI need not load the web stack

            generator.defaults = generator.sampling(**sampling)  # what a request leaves out
            serve(generator, host=args.host, port=args.port, api_key=args.api_key)
        elif args.chat:
            _chat(generator, sampling)
        else:
            _print_stream(generator, args.prompt, sampling)
    except (ArtifactError, EngineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
