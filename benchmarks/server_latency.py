"""The Wyoming server's latency, served for real: end of speech -> transcript, and `describe` under load.

    python benchmarks/server_latency.py --model DIR [--path cascade] [--n 20] [--seconds 3] [--loaders 4]

Starts `serve` on the bundle in a temporary data dir and, as a satellite would, sends `--n` utterances
of `--seconds` (espeak-ng speech padded with silence), timing end of speech -> transcript; then
`--loaders` clients keep the inference thread busy with 30 s utterances while `describe` round trips
(connect included) are timed. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import (  # noqa: E402
    ServerProcess,
    describe_under_load,
    espeak_pcm,
    fit_seconds,
    serve_args,
    transcribe,
)

TEXTS = ["turn on the porch light", "set the temperature to 21 degrees", "start a timer for 5 minutes"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def bench(model: Path, path: str, n: int, seconds: float, loaders: int, threads: int) -> dict:
    """Latency figures of `model` served along `path` with `threads` torch threads."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = ServerProcess(
            serve_args(
                model, work / "data", "--uri", "tcp://127.0.0.1:0", "--path", path, "--threads", str(threads)
            ),
            work / "server.log",
        )
        try:
            server.wait_ready()
            host, port = server.host_port
            eos = []
            for i in range(n):
                speech, rate = espeak_pcm(TEXTS[i % len(TEXTS)], work)
                pcm = speech + b"\0" * max(0, int(seconds * rate) * 2 - len(speech))
                _, latency = await transcribe(host, port, pcm, rate)
                eos.append(latency)
            speech, rate = espeak_pcm(TEXTS[0], work)
            rtts, total = await describe_under_load(
                host, port, fit_seconds(speech, rate, 30.0), rate, loaders
            )
        finally:
            server.stop()
    return {
        "model": str(model),
        "path": path,
        "utterance_s": seconds,
        "n": n,
        "eos_to_transcript_ms_p50": round(percentile(eos, 50) * 1000, 1),
        "eos_to_transcript_ms_p95": round(percentile(eos, 95) * 1000, 1),
        "describe_under_load_n": len(rtts),
        "describe_under_load_ms_p50": round(percentile(rtts, 50) * 1000, 1),
        "describe_under_load_ms_p95": round(percentile(rtts, 95) * 1000, 1),
        "describe_under_load_ms_max": round(max(rtts, default=float("nan")) * 1000, 1),
        "describes_measured_in_all": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--path", default="cascade", help="the server's --path")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--loaders", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (0: all cores)")
    args = parser.parse_args()
    figures = asyncio.run(bench(args.model, args.path, args.n, args.seconds, args.loaders, args.threads))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
