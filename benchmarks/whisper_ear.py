"""The dev model's tiny Whisper: how well does it hear, and numbers above all?

    python benchmarks/whisper_ear.py --model /tmp/small --work /tmp/bench-ear [--steps N] [--extra-base N]

Trains the `dev-model` recipe's tiny Whisper (`devmodel.train_whisper`, the build's data and seed) with the
tokenizer of an existing `small` build, then transcribes the build's 150 held-out utterances (seed + 2,
the voices it trained on) with Whisper's own decoder, as the cascade path does. `--steps 0` skips the
training and measures the build's own Whisper. `--extra-base N` adds N more base-household utterances
(another seed) to the training data. Prints one JSON line: WER, the share of transcripts exactly right,
and the share of utterances with a number whose numbers all came out right (the slot a misheard "49"
breaks); WORK/NAME.json also lists the wrong transcripts.

Compare variants trained side by side, `--threads 1` each: training on several threads is not
repeatable bit for bit (two builds of the same recipe and seed differed by 0.02 WER).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

from wyoming_tinyalign.adapt import bootstrap_speech
from wyoming_tinyalign.devmodel import SIZES, crowd_households, train_whisper
from wyoming_tinyalign.evaluate import word_error_rate
from wyoming_tinyalign.households import load_households
from wyoming_tinyalign.manifest import load_utterances
from wyoming_tinyalign.model.encoder import AudioEncoder
from wyoming_tinyalign.model.speechllm import whisper_transcript


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a `small` dev-model build (its tokenizer)")
    parser.add_argument("--work", type=Path, required=True, help="speech and results go here")
    parser.add_argument("--name", default="run", help="name of this run's result file")
    parser.add_argument("--steps", type=int, default=SIZES["small"].whisper_steps, help="0: the build's own")
    parser.add_argument("--extra-base", type=int, default=0, help="more base-household training utterances")
    parser.add_argument("--seed", type=int, default=0, help="the build's seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    size, seed, work = replace(SIZES["small"], whisper_steps=args.steps), args.seed, args.work
    households = [h for h in load_households() if h.split == "base"]
    heldout = load_utterances(bootstrap_speech(work, "heldout", size.eval_utterances, seed + 2, households))
    tokenizer = AutoTokenizer.from_pretrained(args.model / "whisper")
    feature_extractor = WhisperFeatureExtractor.from_pretrained(args.model / "whisper")
    t = time.monotonic()
    if args.steps:
        crowd = crowd_households(size.crowd_utterances // 20, random.Random(f"{seed}/crowd"))
        sets = [
            ("train", size.speech_utterances, seed, households),
            ("crowd", size.crowd_utterances, seed + 3, crowd),
            ("extra", args.extra_base, seed + 10, households),
        ]
        manifests = [bootstrap_speech(work, *s) for s in sets if s[1]]
        speech = [(audio, u.text) for m in manifests for u, audio in load_utterances(m)]
        print(f"training the tiny Whisper on {len(speech)} utterances for {args.steps} steps", flush=True)
        whisper = train_whisper(tokenizer, feature_extractor, speech, size, seed)
    else:
        whisper = WhisperForConditionalGeneration.from_pretrained(args.model / "whisper").eval()
    train_s = time.monotonic() - t

    encoder = AudioEncoder(whisper.get_encoder(), feature_extractor)
    refs, hyps = [], []
    for utterance, audio in heldout:
        feats, lengths = encoder.encode([audio])
        hyps.append(whisper_transcript(whisper, tokenizer, feats[0, : int(lengths[0])])[0])
        refs.append(" ".join(utterance.text.lower().split()))
    numbers = [(re.findall(r"\d+", r), re.findall(r"\d+", h)) for r, h in zip(refs, hyps, strict=True)]
    numbers = [(r, h) for r, h in numbers if r]
    result = {
        "name": args.name,
        "steps": args.steps,
        "extra_base": args.extra_base,
        "train_s": round(train_s),
        "wer": round(word_error_rate(refs, hyps), 4),
        "exact": round(sum(r == h for r, h in zip(refs, hyps, strict=True)) / len(refs), 3),
        "numbers_right": round(sum(r == h for r, h in numbers) / len(numbers), 3),
        "with_numbers": len(numbers),
        "heldout": len(refs),
    }
    print(json.dumps(result))
    wrong = [[r, h] for r, h in zip(refs, hyps, strict=True) if r != h]
    (work / f"{args.name}.json").write_text(json.dumps({**result, "wrong": wrong}, indent=1))


if __name__ == "__main__":
    main()
