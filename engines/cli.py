"""What every command line of this project (``python -m export``, ``export.parity``, ``serve``, ``bench``) sets
up the same way. Imports nothing heavy: ``python -m serve`` must not load torch through it."""

from __future__ import annotations

import logging
from collections.abc import Iterable


def configure_logging(verbose: bool, loggers: Iterable[str], level: int = logging.INFO) -> None:
    """This project's ``loggers`` at ``level`` (DEBUG with ``verbose``); every library it drives (torch's exporter,
    onnxscript's optimiser, uvicorn) only when it warns."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in loggers:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else level)
