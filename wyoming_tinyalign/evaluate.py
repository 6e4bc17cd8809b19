"""Evaluation: word error rate, intent accuracy and latency of a model on a manifest."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np

from .corpus import Command
from .households import context_text, load_households
from .manifest import Utterance, load_utterances, read_manifest
from .model.speechllm import PATHS, Result, SpeechLLM

_LOGGER = logging.getLogger(__name__)


def normalize_words(text: str) -> list[str]:
    """Lowercase words without punctuation (apostrophes kept): what WER compares."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: word edits over reference words."""
    edits = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = normalize_words(ref), normalize_words(hyp)
        edits += _edit_distance(r, h)
        words += len(r)
    return edits / max(1, words)


def evaluate_text(model: SpeechLLM, pairs: list[tuple[Command, str]]) -> float:
    """Text-only intent accuracy of the LLM on (command, household context) pairs."""
    hits = sum(cmd.intent.matches(model.understand_text(cmd.text, context)) for cmd, context in pairs)
    return hits / max(1, len(pairs))


def score(pairs: list[tuple[Utterance, Result]]) -> dict:
    """WER, intent accuracy (exact and name only) and latency percentiles of results."""
    n = len(pairs)
    latencies = [r.latency_ms for _, r in pairs]
    exact = sum(u.intent.matches(r.intent) for u, r in pairs if u.intent is not None)
    names = sum(
        r.intent is not None and r.intent.name == u.intent.name for u, r in pairs if u.intent is not None
    )
    return {
        "n": n,
        "wer": round(word_error_rate([u.text for u, _ in pairs], [r.transcript for _, r in pairs]), 4),
        "intent_accuracy": round(exact / max(1, n), 4),
        "intent_name_accuracy": round(names / max(1, n), 4),
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1) if n else None,
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1) if n else None,
    }


def evaluate_items(
    model: SpeechLLM, items: list[tuple[Utterance, np.ndarray, str]], path: str, with_intent: bool = True
) -> dict:
    """Run (utterance, audio, household context) items along one path and score them."""
    results = [(u, model.run(a, path, ctx, with_intent=with_intent)) for u, a, ctx in items]
    return {"path": path, **score(results)}


def evaluate_manifest(
    model: SpeechLLM, manifest: Path, path: str, households_file: Path | None = None, context: bool = True
) -> dict:
    """Evaluate every readable utterance of a manifest, each with its household's context."""
    contexts = {h.name: context_text(h) for h in load_households(households_file)} if context else {}
    loaded = load_utterances(manifest)
    report = evaluate_items(model, [(u, a, contexts.get(u.household, "")) for u, a in loaded], path)
    return {**report, "skipped": len(read_manifest(manifest)) - len(loaded), "household_context": context}


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="model bundle folder")
    parser.add_argument(
        "--data-dir", type=Path, help="instead of --model: a data dir (its bundle + promoted version)"
    )
    parser.add_argument("--manifest", required=True, type=Path, help="manifest.jsonl to evaluate on")
    parser.add_argument("--path", choices=PATHS, default="aligned")
    parser.add_argument("--households", type=Path, help="households file for context (default: packaged)")
    parser.add_argument("--no-context", action="store_true", help="leave household context out of the prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_eval(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.data_dir is None):
        raise ValueError("give either --model (a bundle) or --data-dir (a server's data dir)")
    version = None
    if args.data_dir is not None:
        from .versions import load_household_model, recorded_model

        model, version = load_household_model(args.data_dir, args.device)
        args.model = recorded_model(args.data_dir)
    else:
        model = SpeechLLM.load(args.model, device=args.device)
    report = evaluate_manifest(model, args.manifest, args.path, args.households, not args.no_context)
    report["model"] = str(args.model)
    if version is not None:
        report["projector_version"] = version
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 0
