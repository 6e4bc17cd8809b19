"""`--device cuda` at real size: an answer's time on each path, on the GPU and on the CPU, in one run.

    python benchmarks/cuda.py --model /tmp/micro --work /tmp/bench-cuda [--threads 4] [--n 8]

The real-size bundle of `personalization.py` (whisper-base + Qwen2.5-0.5B shapes, random weights, the
dev model's tokenizers: the compute is real, the words are not) is loaded twice as the server loads it:
`--device cuda` (backbones in bfloat16, or float16 where the GPU has no bfloat16) and `--device cpu`
(float32, `--threads`). Each of `--n` rendered utterances of an unseen household is answered on every
path by each, taking turns, with the household's context; the table gives the median time of an answer
(after one warm-up), the GPU's peak memory and how often the two answered alike (half precision and
random weights can tip a greedy choice).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from personalization import dev_objective, real_size_bundle

from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.manifest import load_utterances
from wyoming_tinyalign.model.speechllm import PATHS, SpeechLLM
from wyoming_tinyalign.models import inference_dtype
from wyoming_tinyalign.synth import render_corpus


def answer_ms(model: SpeechLLM, audio: np.ndarray, path: str, context: str) -> tuple[float, str]:
    """Milliseconds of one answer (the GPU's queue drained), and the answer."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = model.run(audio, path, context)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000, f"{result.transcript} | {result.intent}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a dev bundle (for its tokenizers)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=4, help="torch threads of the CPU model")
    parser.add_argument("--n", type=int, default=8, help="utterances")
    parser.add_argument("--device", default="cuda", help="the device set against the CPU (cpu: a dry run)")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    torch.set_num_threads(args.threads)
    objective, weight = dev_objective(args.model)
    bundle = real_size_bundle(args.model, args.work / f"real-size-bundle-{objective}", objective, weight)
    household = next(h for h in load_households() if h.split == "unseen")
    context = context_text(household)
    clips = [
        audio for _, audio in load_utterances(render_corpus(args.work / "speech", [household], args.n, 7))
    ]

    dtype = inference_dtype(args.device)
    models, load_s = {}, {}
    for name, device, precision in (("gpu", args.device, dtype), ("cpu", "cpu", torch.float32)):
        t0 = time.perf_counter()
        models[name] = SpeechLLM.load(bundle, device, precision)
        load_s[name] = time.perf_counter() - t0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    gpu_name = torch.cuda.get_device_name() if on_gpu else "no GPU"
    print(f"{date.today()}, {platform.machine()} {os.cpu_count()} cores, {gpu_name}, "
          f"torch {torch.__version__}; CPU model on {args.threads} threads; {len(clips)} utterances; "
          f"load s: {args.device} {load_s['gpu']:.1f}, cpu {load_s['cpu']:.1f}\n")  # fmt: skip
    print(f"| path | {args.device} {str(dtype).split('.')[-1]} ms p50 (max) | cpu float32 ms p50 (max) "
          f"| cpu / {args.device} | same answer |")  # fmt: skip
    print("|---|---|---|---|---|")
    for path in PATHS:
        for model in models.values():
            answer_ms(model, clips[0], path, context)  # warm-up
        ms: dict[str, list[float]] = {name: [] for name in models}
        same = 0
        for audio in clips:
            answers = {}
            for name, model in models.items():
                t, answers[name] = answer_ms(model, audio, path, context)
                ms[name].append(t)
            same += answers["gpu"] == answers["cpu"]
        gpu, cpu = statistics.median(ms["gpu"]), statistics.median(ms["cpu"])
        print(f"| {path} | {gpu:.0f} ({max(ms['gpu']):.0f}) | {cpu:.0f} ({max(ms['cpu']):.0f}) "
              f"| {cpu / gpu:.1f} | {same} of {len(clips)} |")  # fmt: skip
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"\nGPU memory: peak {peak:.0f} MiB allocated while answering")


if __name__ == "__main__":
    main()
