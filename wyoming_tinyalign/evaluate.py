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
from .intents import Answer
from .manifest import Utterance, load_utterances, read_manifest
from .model.speechllm import Result, SpeechLLM
from .models import add_dtype_arg, inference_dtype
from .worker import PATH_CHOICES, choose_path

_LOGGER = logging.getLogger(__name__)


def normalize_words(text: str) -> list[str]:
    """Lowercase words without punctuation (apostrophes kept): what WER compares."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_edits(ref: str, hyp: str) -> int:
    """Word edits (substitutions, insertions, deletions) from a reference to a hypothesis."""
    return _edit_distance(normalize_words(ref), normalize_words(hyp))


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
        edits += word_edits(ref, hyp)
        words += len(normalize_words(ref))
    return edits / max(1, words)


def evaluate_text(model: SpeechLLM, pairs: list[tuple[Command | Utterance, str]]) -> float:
    """Text-only intent accuracy of the LLM on (command or utterance with an intent, household context)
    pairs."""
    hits = sum(cmd.intent.matches(model.understand_text(cmd.text, context)) for cmd, context in pairs)
    return hits / max(1, len(pairs))


def score_answers(refs: list[Utterance], got: list[Answer]) -> dict:
    """WER on all utterances; intent accuracy (exact, and name only) on those with a reference intent
    (None when there is none)."""
    with_intent = [(u.intent, hyp) for u, (_, hyp) in zip(refs, got, strict=True) if u.intent is not None]
    exact = sum(ref.matches(hyp) for ref, hyp in with_intent)
    names = sum(hyp is not None and hyp.name == ref.name for ref, hyp in with_intent)
    wer = word_error_rate([u.text for u in refs], [text for text, _ in got]) if refs else None
    return {
        "n": len(refs),
        "n_intent": len(with_intent),
        "wer": round(wer, 4) if wer is not None else None,
        "intent_accuracy": round(exact / len(with_intent), 4) if with_intent else None,
        "intent_name_accuracy": round(names / len(with_intent), 4) if with_intent else None,
    }


def score(pairs: list[tuple[Utterance, Result]]) -> dict:
    """`score_answers` of results, with their latency percentiles."""
    latencies = [r.latency_ms for _, r in pairs]
    return {
        **score_answers([u for u, _ in pairs], [(r.transcript, r.intent) for _, r in pairs]),
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1) if pairs else None,
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1) if pairs else None,
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
    parser.add_argument(
        "--path",
        choices=PATH_CHOICES,
        default="auto",
        help="the path to answer on; auto: the one `serve --path auto` takes with this model (the report "
        "names it)",
    )
    parser.add_argument("--households", type=Path, help="households file for context (default: packaged)")
    parser.add_argument("--no-context", action="store_true", help="leave household context out of the prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_dtype_arg(parser)


def run_eval(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.data_dir is None):
        raise ValueError("give either --model (a bundle) or --data-dir (a server's data dir)")
    version, dtype = None, inference_dtype(args.device, args.dtype)
    if args.data_dir is not None:
        from .versions import load_household_model, recorded_model

        model, version = load_household_model(args.data_dir, args.device, dtype)
        args.model = recorded_model(args.data_dir)
    else:
        model = SpeechLLM.load(args.model, device=args.device, dtype=dtype)
    path = choose_path(args.path, model)
    report = evaluate_manifest(model, args.manifest, path, args.households, not args.no_context)
    report["model"] = str(args.model)
    if version is not None:
        report["projector_version"] = version
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 0
