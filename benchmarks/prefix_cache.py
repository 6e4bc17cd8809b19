"""The prompt prefix KV cache: the LLM's answer with and without it, at Qwen2.5-0.5B shapes.

    python benchmarks/prefix_cache.py --model /tmp/small --threads 2 [--repeats 7]

The household context sits in the prompt before the audio slot, so its keys and values are the same
for every request of a household: `SpeechLLM.generate` computes them once per context and starts each
answer from a copy. This prints, for households of growing size (up to the server's cap on names in
the prompt), the prefix length in tokens and the median time of the aligned path's LLM step (the
projected audio is 24 vectors) with the cache and over the whole prompt, measured alternately in one
run: to the first answer token, and for a 20-token answer (about the length of
"turn on the kitchen light" plus its intent line). Random weights, the dev build's tokenizer: its
small vocabulary splits names into more tokens than Qwen's would.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from realsize import speech_llm

from wyoming_tinyalign.hass import MAX_NAMES
from wyoming_tinyalign.households import load_households
from wyoming_tinyalign.model.speechllm import SpeechLLM


def contexts() -> list[tuple[int, str]]:
    """(names, context) for homes of 10, 25 and `MAX_NAMES` area and device names (the most the server
    puts in a prompt), a quarter of them areas, from the packaged households, as `context_text` writes it."""
    households = load_households()
    devices = sorted({d.name for h in households for d in h.devices})
    areas = sorted({a for h in households for a in h.areas})
    sizes = (10, 25, MAX_NAMES)
    return [
        (n, f"areas: {', '.join(areas[: n // 4])}; devices: {', '.join(devices[: n - n // 4])}")
        for n in sizes
    ]


def timed(model: SpeechLLM, embeds: torch.Tensor, context: str | None, tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    answer = model.generate(embeds, context, max_new_tokens=tokens)
    return time.perf_counter() - t0, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a dev-model build (its tokenizers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = speech_llm(SpeechLLM.load(args.model))
    model.max_new_tokens = 20  # random weights never stop on their own; a typical answer's length
    hidden = model.llm.config.hidden_size
    print(
        f"Date {date.today()}; machine: {platform.machine()} {os.cpu_count()} cores, "
        f"{args.threads} torch threads; Qwen2.5-0.5B shapes, float32, random weights\n"
    )
    print("| area and device names | prefix tokens | prompt tokens | first token: cached / whole (ratio) "
          "| 20-token answer: cached / whole (ratio) | same answer |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, context in contexts():
        audio = torch.randn(24, hidden) * 0.02
        embeds, span = model.prompt_embeds(audio, context)
        model.prefix_cache(context)  # built once per context (as long as one whole-prompt run), then reused
        row = []
        for tokens in (1, 20):
            times: dict[str, list[float]] = {"cached": [], "whole": []}
            answers = {}
            for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
                for name, ctx in (("cached", context), ("whole", None)):
                    seconds, answers[name] = timed(model, embeds, ctx, tokens)
                    times[name].append(seconds)
            cached, whole = (statistics.median(times[k]) * 1000 for k in ("cached", "whole"))
            row.append(f"{cached:.0f} / {whole:.0f} ms ({whole / cached:.1f}x)")
        same = "yes" if answers["cached"] == answers["whole"] else "no"
        print(f"| {n} | {span.start} | {embeds.shape[1]} | {row[0]} | {row[1]} | {same} |", flush=True)


if __name__ == "__main__":
    main()
