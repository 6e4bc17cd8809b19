"""The cascade's bias toward the household's names (`model/biasing.py`): what each bonus does.

    python benchmarks/name_bias.py --model /tmp/readme/data/models/dev-small --work /tmp/bench-bias \
        [--bonuses 0,1,2,3] [--threads 1]

Renders, with the seeds `personalization.py` uses, each unseen household's 100 labelled utterances
(where a bonus is chosen) and 50 held-out ones (where it is read), and 120 utterances of the base
households (the voices the model trained on); then runs the cascade on each set at each bonus (0: no
bias), each utterance with its own household's context. Prints one line per set and bonus: intent
accuracy and WER.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from wyoming_tinyalign.evaluate import score_answers
from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.manifest import load_utterances
from wyoming_tinyalign.model.biasing import NameBias
from wyoming_tinyalign.model.speechllm import SpeechLLM, whisper_transcript
from wyoming_tinyalign.synth import render_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a dev-model bundle")
    parser.add_argument("--work", type=Path, required=True, help="the speech goes here")
    parser.add_argument("--bonuses", default="0,1,2,3", help="comma-separated log-probability bonuses")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    households = load_households()
    unseen = [h for h in households if h.split == "unseen"]
    sets = [
        ("base", render_corpus(args.work / "base", [h for h in households if h.split == "base"], 120, 777))
    ]
    for i, household in enumerate(unseen):  # (personalization.py's seeds: night 1's labelled, held-out)
        sets.append(
            (
                f"{household.name} labelled",
                render_corpus(args.work / household.name, [household], 100, 100 + i),
            )
        )
        sets.append(
            (
                f"{household.name} held-out",
                render_corpus(args.work / f"{household.name}-heldout", [household], 50, 200 + i),
            )
        )
    contexts = {h.name: context_text(h) for h in households}
    model = SpeechLLM.load(args.model)
    tokenizer = model.whisper_tokenizer
    for name, manifest in sets:
        items = load_utterances(manifest)
        feats = [model.encode(audio, pad_30s=model.cascade_pad_30s) for _, audio in items]
        for bonus in (float(b) for b in args.bonuses.split(",")):
            answers = []
            for (utterance, _), f in zip(items, feats, strict=True):
                context = contexts[utterance.household]
                bias = NameBias.from_context(tokenizer, context, bonus) if bonus else None
                text = whisper_transcript(model.whisper, tokenizer, f, bias=bias)[0]
                answers.append((text, model.understand_text(text, context)))
            scores = score_answers([u for u, _ in items], answers)
            figures = {k: scores[k] for k in ("n", "intent_accuracy", "wer")}
            print(json.dumps({"set": name, "bonus": bonus, **figures}), flush=True)


if __name__ == "__main__":
    main()
