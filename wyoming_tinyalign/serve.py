"""`wyoming-tinyalign serve`: load (or build) the model and serve it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

_LOGGER = logging.getLogger(__name__)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="where models and logs live")
    parser.add_argument("--model", default="dev", help="bundle folder, or 'dev' for the offline demo model")


def run_serve(args: argparse.Namespace) -> int:
    from .model.speechllm import SpeechLLM

    folder = Path(args.model)
    if args.model == "dev":
        folder = args.data_dir / "models" / "dev-small"
        if not (folder / "bundle.json").is_file():
            from .devmodel import build_dev_model

            _LOGGER.warning("building the offline demo model into %s (about 20 minutes, once)", folder)
            build_dev_model(folder, "small")
    model = SpeechLLM.load(folder, device=args.device)
    aligned = (
        "aligned projector" if model.has_aligned_projector else "cascade only (no aligned projector yet)"
    )
    _LOGGER.info("model %s loaded: %s; ready", folder, aligned)
    return 0
