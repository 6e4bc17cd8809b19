"""Server memory benchmark: the server's RSS over many requests at real-size shapes, with glibc's default
malloc against the fixed mmap threshold the nightly job runs with (`memory.return_freed_memory`).

    python benchmarks/server_memory.py --model /tmp/small [--work /tmp/bench-server-memory] [--n 150]

Two `serve` processes of one real-size bundle (whisper-base + Qwen2.5-0.5B shapes, random weights; built
once into WORK as `personalization.py` builds it), `--path aligned`, one torch thread each; the second
has `MALLOC_MMAP_THRESHOLD_` set, which fixes the threshold as `mallopt` does. Each utterance (espeak-ng
speech of the unseen households) goes to one server, then to the other, as a satellite sends it, so one
server computes at a time and drift on a shared machine hits both alike. Prints the RSS after loading,
after the first request and after every 50, the peak (VmHWM), and the answer latency, median and paired.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
import wave
from datetime import date
from pathlib import Path

from personalization import real_size_bundle
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.pipeline import PipelineStage, RunPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import ServerProcess, serve_args  # noqa: E402

from wyoming_tinyalign.households import load_households  # noqa: E402
from wyoming_tinyalign.manifest import read_manifest  # noqa: E402
from wyoming_tinyalign.memory import MMAP_THRESHOLD  # noqa: E402
from wyoming_tinyalign.synth import render_corpus  # noqa: E402

VARIANTS = {"glibc default": {}, "threshold fixed": {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}}


def status_mib(pid: int, field: str) -> float:
    """A memory field of /proc/PID/status (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


async def say(port: int, wav_path: Path) -> float:
    """One utterance as a satellite sends it (run-pipeline asr -> intent); seconds to the answer."""
    with wave.open(str(wav_path), "rb") as wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        pcm = wav.readframes(wav.getnframes())
    t0 = time.perf_counter()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(
            RunPipeline(start_stage=PipelineStage.ASR, end_stage=PipelineStage.INTENT).event()
        )
        await client.write_event(AudioStart(rate, width, channels).event())
        step = rate * width * channels // 10
        for i in range(0, len(pcm), step):
            await client.write_event(AudioChunk(rate, width, channels, pcm[i : i + step]).event())
        await client.write_event(AudioStop().event())
        while (event := await client.read_event()) is not None:
            if event.type in ("intent", "not-recognized", "error"):
                break
    return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> None:
    bundle = real_size_bundle(args.model, args.work / "real-size-bundle", "combined", 0.1)
    unseen = [h for h in load_households() if h.split == "unseen"]
    manifest = render_corpus(args.work / "speech", unseen, args.n, seed=400)
    wavs = [utt.audio for utt in read_manifest(manifest)]
    servers = {}
    for name, env in VARIANTS.items():
        work = args.work / name.replace(" ", "-")
        work.mkdir(parents=True, exist_ok=True)
        flags = ["--uri", "tcp://127.0.0.1:0", "--path", "aligned", "--web-port", "off", "--adapt-at", "off"]
        servers[name] = ServerProcess(serve_args(bundle, work / "data", *flags), work / "server.log", env)
    try:
        for server in servers.values():
            server.wait_ready(600)
        loaded = {n: status_mib(s.proc.pid, "VmRSS") for n, s in servers.items()}
        rss: dict[str, list[float]] = {n: [] for n in servers}
        latency: dict[str, list[float]] = {n: [] for n in servers}
        for wav_path in wavs:
            for name, server in servers.items():
                latency[name].append(await say(server.host_port[1], wav_path))
                rss[name].append(status_mib(server.proc.pid, "VmRSS"))
        peak = {n: status_mib(s.proc.pid, "VmHWM") for n, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    print(f"{date.today()}, {platform.machine()}, {len(wavs)} utterances to each server, 1 thread each\n")
    marks = [1, *range(50, len(wavs) + 1, 50)]
    print(
        "| malloc | RSS MiB loaded | "
        + " | ".join(f"after {m}" for m in marks)
        + " | peak | latency median |"
    )
    print("|---" * (len(marks) + 4) + "|")
    for name in servers:
        curve = " | ".join(f"{rss[name][m - 1]:.0f}" for m in marks)
        median = statistics.median(latency[name]) * 1000
        print(f"| {name} | {loaded[name]:.0f} | {curve} | {peak[name]:.0f} | {median:.0f} ms |")
    default, fixed = (latency[n] for n in VARIANTS)
    ratios = [b / a for a, b in zip(default, fixed, strict=True)]
    print(
        f"\nlatency, fixed / default, the same utterance: median {statistics.median(ratios):.3f}, "
        f"slower in {sum(r > 1 for r in ratios) / len(ratios):.0%} of the pairs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a dev-model build (its tokenizers)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-server-memory"))
    parser.add_argument("--n", type=int, default=150, help="utterances sent to each server")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
