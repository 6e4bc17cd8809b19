"""The household's memory on Whisper's decoder (`model/decoder_memory.py`) at other weights, offline.

    python benchmarks/decoder_memory.py --model /tmp/readme2/data/models/dev-small --work /tmp/bench-mem \
        [--weights 0,0.1,0.25,0.35,0.5] [--adapters PERSONALIZATION_WORK]

A night builds the memory from the household's corrections (those its decoder adapters learn from and
those held out to judge them), read through them, and serves it at `decoder_memory.WEIGHT`; this
measures it apart from the adapters and from the night. For each unseen household, the same 100
corrected and 50 held-out utterances as `personalization.py` (its seeds); the night's own rule
(`adapt.held_out` on the row ids 1-100 the benchmark's log gives them) holds 1 in 5 corrections out, as
its gate's judges, and the memory holds them all, those marked as judges (`decoder_train.remember`).
The cascade (greedy, leaning toward the household's names, as served) with
the memory mixed in at each of `--weights` (0: the cascade without it): intent accuracy / WER on the 50
held out and on the night's 60 general base-household commands (the other voices), with the whole
memory, as served; on the night's held-out corrections, without them, as the night judges; and of
the 50 held out, what the server would do with their intents at the default `--min-confidence` (the
memory raises a transcript's confidence where it agrees): act on a right one, a wrong one, or withhold.
`--adapters WORK`: each household's decoder adapters from the newest version its night left in a
`personalization.py` work dir (WORK/quality/NAME/data, the memory the night built left out), under the
memory built here. Prints a markdown table and writes WORK/decoder_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from decoder_adaptation import cascade_score

from wyoming_tinyalign.adapt import GENERAL_SEED, bootstrap_speech, held_out
from wyoming_tinyalign.assistant import DEFAULT_MIN_CONFIDENCE
from wyoming_tinyalign.decoder_train import decoder_examples, remember
from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.manifest import load_utterances
from wyoming_tinyalign.model.decoder_memory import with_memory
from wyoming_tinyalign.model.speechllm import SpeechLLM
from wyoming_tinyalign.synth import render_once
from wyoming_tinyalign.versions import Versions


def _examples(model: SpeechLLM, pairs: list) -> list:
    """(utterance, audio) pairs as the night's decoder examples of their transcripts."""
    return decoder_examples(model, [u.text for u, _ in pairs], [a for _, a in pairs], ["en"] * len(pairs))


def household_rows(args: argparse.Namespace, index: int, name: str, general: list) -> dict:
    """The memory of one household's corrections at each weight, on its sets."""
    household = next(h for h in load_households() if h.name == name)
    contexts = {h.name: context_text(h) for h in load_households()}
    model = SpeechLLM.load(args.model)
    version = None
    if args.adapters is not None:
        versions = Versions(args.adapters / "quality" / name / "data")
        newest = versions.names()[-1] if versions.names() else None
        if newest is not None and (shaped := versions.adapter(newest)) is not None:
            model.set_decoder_adapter(with_memory(shaped[0], None), shaped[1])
            version = newest
    # personalization.py's seeds: night 1's corrected utterances and the held-out ones
    work = args.work / name
    labelled = load_utterances(render_once(work / "labelled", [household], args.labelled, 100 + index))
    heldout = load_utterances(render_once(work / "heldout", [household], 50, 200 + index))
    judged = [held_out(row_id, args.heldout_every) for row_id in range(1, len(labelled) + 1)]
    learnt = _examples(model, [pair for pair, out in zip(labelled, judged, strict=True) if not out])
    judging = _examples(model, [pair for pair, out in zip(labelled, judged, strict=True) if out])
    memory = remember(model.whisper, learnt + judging, frozenset(x.key for x in judging))
    sets = {
        "held-out 50": [(u, model.encode(a)) for u, a in heldout],
        "night's held-out": [
            (u, model.encode(a)) for (u, a), out in zip(labelled, judged, strict=True) if out
        ],
        "general": [(u, model.encode(a)) for u, a in general],
    }
    rows = []
    for weight in args.weights:
        row = {"weight": weight}
        for set_name, items in sets.items():  # (as served, at this weight; as the night judges it)
            served = memory.judged() if set_name == "night's held-out" else memory
            model.decoder_memory = replace(served, weight=weight) if weight and served else None
            row[set_name] = cascade_score(model, items, contexts)
        print(name, json.dumps(row), flush=True)
        rows.append(row)
    return {
        "household": name,
        "adapters": version,
        "memory_states": len(memory.values),
        "judged": len(sets["night's held-out"]),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the dev bundle")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument(
        "--weights", type=lambda s: [float(x) for x in s.split(",")], default=[0, 0.1, 0.25, 0.35, 0.5]
    )
    parser.add_argument("--adapters", type=Path, help="a personalization.py work dir: its nights' adapters")
    parser.add_argument("--labelled", type=int, default=100)
    parser.add_argument("--heldout-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = [h for h in load_households() if h.split == "base"]
    general = load_utterances(bootstrap_speech(args.work / "bootstrap", "general", 60, GENERAL_SEED, base))
    unseen = [h.name for h in load_households() if h.split == "unseen"]
    results = [household_rows(args, i, name, general) for i, name in enumerate(unseen)]
    print(
        f"\nDate {date.today()}; machine: {platform.machine()} {torch.get_num_threads()} thread(s); "
        f"{args.labelled} corrections, 1 in {args.heldout_every} held out.\n"
    )
    print(
        "| household | adapters | states | weight | held-out 50 | night's held-out | general 60 "
        f"| held-out 50 at --min-confidence {DEFAULT_MIN_CONFIDENCE}: acted right / acted wrong / withheld |"
    )
    print("|---" * 8 + "|")
    for result in results:
        for row in result["rows"]:
            cells = [result["household"], result["adapters"] or "-", result["memory_states"], row["weight"]]
            cells += [
                f"{row[k]['intent_accuracy']:.2f} / {row[k]['wer']:.3f}"
                for k in ("held-out 50", "night's held-out", "general")
            ]
            cells.append(" / ".join(f"{share:.2f}" for share in row["held-out 50"]["acted"]))
            print("| " + " | ".join(str(c) for c in cells) + " |")
    out = {"date": str(date.today()), "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.work / "decoder_memory.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
