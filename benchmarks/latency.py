"""KV caches on the answer's path at real-size shapes, each with and without, alternately in one run.

    python benchmarks/latency.py --model /tmp/small --threads 2 [--repeats 7]

1. The LLM's prompt prefix (Qwen2.5-0.5B shapes). The household context sits in the prompt before the
   audio slot, so its keys and values are the same for every request of a household: `SpeechLLM.generate`
   computes them once per context and starts each answer from a copy. For households of growing size (up
   to the server's cap on names in the prompt): the prefix length in tokens and the median time of the
   aligned path's LLM step (the projected audio is 24 vectors), with the cache and over the whole prompt,
   to the first answer token and for a 20-token answer (about "turn on the kitchen light" and its intent
   line). The dev build's tokenizer: its small vocabulary splits names into more tokens than Qwen's.
2. Whisper's decoder on the cascade path (whisper-base shapes): `whisper_transcript` runs the decoder on
   one new token per step, its self- and cross-attention keys and values cached; the reference re-runs
   it over the whole sequence at every step. 20 tokens, on the encoder states of a 3 s clip and of a
   clip padded to 30 s (as the presets' real Whisper checkpoints are run).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from realsize import speech_llm
from transformers import WhisperForConditionalGeneration

from wyoming_tinyalign.hass import MAX_NAMES
from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.model.speechllm import SpeechLLM, whisper_prompt, whisper_transcript


def contexts() -> list[tuple[int, str]]:
    """(names, context) for homes of 10, 25 and `MAX_NAMES` area and device names (the most the server
    puts in a prompt), a quarter of them areas, taken from all the packaged households."""
    households = load_households()
    devices = sorted({d.name: d for h in households for d in h.devices}.items())
    areas = sorted({a for h in households for a in h.areas})
    home = households[0]
    return [
        (n, context_text(replace(home, areas=areas[: n // 4], devices=[d for _, d in devices[: n - n // 4]])))
        for n in (10, 25, MAX_NAMES)
    ]


def timed(run, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = run(*args)
    return time.perf_counter() - t0, result


def alternate(runs: dict[str, tuple], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median milliseconds of each run, taking turns so drift on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, (run, *args) in runs.items():
            seconds, results[name] = timed(run, *args)
            times[name].append(seconds)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}, results


@torch.no_grad()
def decode_rerunning(
    whisper: WhisperForConditionalGeneration, tokenizer, feats: torch.Tensor, tokens: int
) -> str:
    """`whisper_transcript` as it was: the decoder re-run over the whole sequence at every step."""
    ids, banned = whisper_prompt(whisper, tokenizer)
    start = len(ids)
    for _ in range(tokens):
        logits = whisper(encoder_outputs=(feats[None],), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
        logits[banned] = -float("inf")
        if int(logits.argmax()) == whisper.generation_config.eos_token_id:
            break
        ids.append(int(logits.argmax()))
    return " ".join(tokenizer.decode(ids[start:], skip_special_tokens=True).strip().lower().split())


def llm_prefix(model: SpeechLLM, repeats: int) -> None:
    hidden = model.llm.config.hidden_size
    print("| area and device names | prefix tokens | prompt tokens | first token: cached / whole (ratio) "
          "| 20-token answer: cached / whole (ratio) | same answer |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, context in contexts():
        audio = torch.randn(24, hidden) * 0.02
        embeds, span = model.prompt_embeds(audio, context)
        model.prefix_cache(context)  # built once per context (as long as one whole-prompt run), then reused
        row = []
        for tokens in (1, 20):
            runs = {
                "cached": (model.generate, embeds, context, tokens),
                "whole": (model.generate, embeds, None, tokens),
            }
            ms, answers = alternate(runs, repeats)
            row.append(f"{ms['cached']:.0f} / {ms['whole']:.0f} ms ({ms['whole'] / ms['cached']:.1f}x)")
        same = "yes" if answers["cached"] == answers["whole"] else "no"
        print(f"| {n} | {span.start} | {embeds.shape[1]} | {row[0]} | {row[1]} | {same} |", flush=True)


def whisper_decoder(model: SpeechLLM, repeats: int) -> None:
    whisper = model.whisper
    print("\n| encoder states | 20 tokens: cached / re-run (ratio) | same transcript |")
    print("|---|---|---|")
    for seconds in (3, 30):
        feats = torch.randn(seconds * 50, whisper.config.d_model)
        runs = {
            "cached": (whisper_transcript, whisper, model.whisper_tokenizer, feats, None, 20),
            "rerun": (decode_rerunning, whisper, model.whisper_tokenizer, feats, 20),
        }
        ms, texts = alternate(runs, repeats)
        same = "yes" if texts["cached"][0] == texts["rerun"] else "no"
        print(f"| {seconds} s ({len(feats)} frames) | {ms['cached']:.0f} / {ms['rerun']:.0f} ms "
              f"({ms['rerun'] / ms['cached']:.1f}x) | {same} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a dev-model build (its tokenizers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = SpeechLLM.load(args.model)
    model = speech_llm(dev)
    model.whisper.generation_config = dev.whisper.generation_config
    model.max_new_tokens = 20  # random weights never stop on their own; a typical answer's length
    print(
        f"Date {date.today()}; machine: {platform.machine()} {os.cpu_count()} cores, "
        f"{args.threads} torch threads; float32, random weights\n"
    )
    llm_prefix(model, args.repeats)
    whisper_decoder(model, args.repeats)


if __name__ == "__main__":
    main()
