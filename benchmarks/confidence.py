"""Confidence benchmark: how often the server would act on a wrong intent, and how often it withholds a
right one, at each `--min-confidence`.

    python benchmarks/confidence.py --model /tmp/small [--work /tmp/bench-confidence] [--n 150] [--seed 21]

Renders `--n` utterances of the base households (voices the model trained on; new sentences) and `--n`
of the unseen ones (voices and device names it never heard), runs each along the aligned and the cascade
path with its household's context, and scores every answer once. Then, for each threshold, as the
server answers (`assistant.unsure`): an intent is *acted on right*, *acted on wrong* (the wrong device,
number or intent: the failure a household notices), or *withheld* ("not understood"); an answer with
no intent counts as neither. Shares are of the utterances with a reference intent.

Prints a markdown table (for benchmarks/RESULTS.md) and writes every answer to WORK/confidence.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from wyoming_tinyalign.assistant import DEFAULT_MIN_CONFIDENCE, unsure
from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.manifest import Utterance, load_utterances
from wyoming_tinyalign.model.speechllm import Result, SpeechLLM
from wyoming_tinyalign.synth import render_corpus

PATHS = ("aligned", "cascade")
THRESHOLDS = (None, -0.5, -0.3, -0.2, -0.15, -0.1, -0.05)


@dataclass
class Answer:
    """One utterance's answer and whether its intent was right, wrong or none."""

    text: str
    result: Result
    outcome: str


def answer(utt: Utterance, result: Result) -> Answer:
    """`result` as the answer to `utt` (which has a reference intent)."""
    assert utt.intent is not None
    outcome = "none" if result.intent is None else "right" if utt.intent.matches(result.intent) else "wrong"
    return Answer(utt.text, result, outcome)


def answers(model: SpeechLLM, manifest: Path, path: str, contexts: dict[str, str]) -> list[Answer]:
    """The answers along `path` to every utterance with a reference intent (`contexts`: by household)."""
    return [
        answer(utt, model.run(audio, path, contexts[utt.household]))
        for utt, audio in load_utterances(manifest)
        if utt.intent is not None
    ]


def shares(rows: list[Answer], threshold: float | None) -> tuple[float, float, float]:
    """(acted on right, acted on wrong, withheld) as the server would answer at `threshold`."""
    withheld = sum(unsure(a.result, threshold) for a in rows)
    acted = [a.outcome for a in rows if a.outcome != "none" and not unsure(a.result, threshold)]
    n = len(rows) or 1
    return acted.count("right") / n, acted.count("wrong") / n, withheld / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="bundle folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-confidence"))
    parser.add_argument("--n", type=int, default=150, help="utterances per split")
    parser.add_argument("--seed", type=int, default=21, help="speech of this seed (base: seed + 900)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    households = load_households()
    contexts = {h.name: context_text(h) for h in households}
    model = SpeechLLM.load(args.model)
    report: dict[str, dict[str, list[Answer]]] = {}
    for split, seed in (("base", args.seed + 900), ("unseen", args.seed)):
        chosen = [h for h in households if h.split == split]
        manifest = render_corpus(args.work / f"{split}-{seed}", chosen, args.n, seed)
        report[split] = {path: answers(model, manifest, path, contexts) for path in PATHS}
    saved = {s: {p: [asdict(a) for a in rows] for p, rows in paths.items()} for s, paths in report.items()}
    meta = {
        "date": str(date.today()),
        "machine": platform.machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.work / "confidence.json").write_text(json.dumps({**meta, **saved}, indent=1))

    print(
        f"`--model {args.model}`, {args.n} utterances per split, seed {args.seed}, {args.threads} thread(s)"
    )
    print("right / wrong / withheld: shares of the utterances with a reference intent\n")
    print("| --min-confidence | " + " | ".join(f"{s} {p}" for s in ("base", "unseen") for p in PATHS) + " |")
    print("|---" * 5 + "|")
    for threshold in THRESHOLDS:
        label = "off" if threshold is None else f"{threshold:g}"
        if threshold == DEFAULT_MIN_CONFIDENCE:
            label = f"**{label}** (default)"
        cells = [
            "{:.3f} / {:.3f} / {:.3f}".format(*shares(report[s][p], threshold))
            for s in ("base", "unseen")
            for p in PATHS
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
