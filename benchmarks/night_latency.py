"""Answers while a night runs: the server's answer latency alone and while its nightly job trains, at
real-size shapes, in one run.

    python benchmarks/night_latency.py --model DEV_BUILD [--work /tmp/bench-night-latency] [--pause 5]
        [--adapt-threads N]

One `serve` of the real-size bundle (whisper-base + Qwen2.5-0.5B shapes, random weights, built as
`personalization.py` builds it) with the server's defaults: answers on all cores, the nightly job in its
own process at `nice` 10 with its default torch threads (or `--adapt-threads`) and a 10-minute budget;
`--path aligned`. Its log holds 200 corrected utterances of an unseen household, and the base
households' replay and general speech is rendered beforehand (a night after the first). Utterances of
that household go to the server as a satellite sends them (run-pipeline asr -> intent), one every
`--pause` seconds, after one to warm up: `--n` utterances before the night, then `POST /api/adapt` and
the same ones over and over until the night ends, then the `--n` again. Prints the latency of each
phase, each answer during the night against the same utterance's before it (the model served until the
night ends: after it, a promoted version may answer at another length), what the night did, and the
memory of the server and the job together. The data dir is made anew each run (a first night).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import time
import urllib.request
from contextlib import suppress
from datetime import date
from pathlib import Path

from personalization import household_file, log_corrected, real_size_bundle
from server_memory import say, status_mib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import WEB, ServerProcess, serve_args  # noqa: E402

from wyoming_tinyalign.adapt import GENERAL_SEED, REPLAY_SEED, bootstrap_speech  # noqa: E402
from wyoming_tinyalign.households import load_households  # noqa: E402
from wyoming_tinyalign.manifest import read_manifest  # noqa: E402
from wyoming_tinyalign.synth import render_corpus  # noqa: E402

REPLAY_N, GENERAL_N = 400, 60  # the job's defaults
TOKEN = "bench"


def api(web: str, method: str, path: str) -> dict:
    request = urllib.request.Request(
        f"{web}/api/{path}", method=method, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read() or b"{}")


def family_mib(pid: int) -> float:
    """Resident memory of a process and its children (the server and its job), in MiB."""
    total = status_mib(pid, "VmRSS")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with suppress(OSError, KeyError):  # ended meanwhile
                total += family_mib(int(child))
    return total


def summary(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"{len(ms)} | {statistics.median(ms):.0f} | {p95:.0f} | {ms[-1]:.0f}"


async def run(args: argparse.Namespace) -> None:
    work = args.work
    bundle = real_size_bundle(args.model, work / "real-size-bundle", "combined", 0.1)
    base = [h for h in load_households() if h.split == "base"]
    bootstrap = work / "bootstrap"
    bootstrap_speech(bootstrap, "replay", REPLAY_N, REPLAY_SEED, base)
    bootstrap_speech(bootstrap, "general", GENERAL_N, GENERAL_SEED, base)
    household = next(h for h in load_households() if h.split == "unseen")
    logged = render_corpus(work / "logged", [household], 200, seed=300)
    said = [u.audio for u in read_manifest(render_corpus(work / "said", [household], args.n, seed=401))]
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    log_corrected(data, bundle, logged)
    flags = [
        "--uri", "tcp://127.0.0.1:0", "--path", "aligned", "--web-port", "0", "--web-token", TOKEN,
        "--adapt-at", "off", "--context-file", str(household_file(household, work / "household.json")),
        "--adapt-args", f"--bootstrap-dir {bootstrap} --replay-n {REPLAY_N} --general-n {GENERAL_N}",
    ]  # fmt: skip
    if args.adapt_threads:
        flags += ["--adapt-threads", str(args.adapt_threads)]
    server = ServerProcess(serve_args(bundle, data, *flags), work / "server.log")
    phases: dict[str, list[tuple[int, float]]] = {
        "alone, before": [], "while the night runs": [], "alone, after": []
    }  # fmt: skip
    peak_mib = 0.0
    try:
        server.wait_ready(900)
        web = server.wait_log(WEB).group(1)
        port, pid = server.host_port[1], server.proc.pid

        async def one(phase: str, i: int) -> None:
            nonlocal peak_mib
            phases[phase].append((i, await say(port, said[i])))
            peak_mib = max(peak_mib, family_mib(pid))
            await asyncio.sleep(args.pause)

        await say(port, said[0])  # the first answer after loading is slower
        for i in range(args.n):
            await one("alone, before", i)
        night_start = time.monotonic()
        api(web, "POST", "adapt")
        i = 0
        while api(web, "GET", "adaptations?limit=1")["running"]:
            await one("while the night runs", i % args.n)
            i += 1
        night_wall = time.monotonic() - night_start
        for i in range(args.n):
            await one("alone, after", i)
        report = api(web, "GET", "adaptations?limit=1")["items"][0]["report"]
        server_peak = status_mib(pid, "VmHWM")
    finally:
        server.stop()

    print(
        f"{date.today()}, {platform.machine()}, one utterance every {args.pause:g} s; the server on all "
        f"cores, the job at nice 10 with {report.get('threads')} torch threads\n"
    )
    print("| phase | answers | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|")
    for phase, timed in phases.items():
        print(f"| {phase} | {summary([s for _, s in timed])} |")
    # Against the answers before the night: its model serves until the night ends (a promoted one after).
    alone = dict(phases["alone, before"])
    ratios = [s / alone[i] for i, s in phases["while the night runs"]]
    train = report.get("train") or {}
    decoder = report.get("decoder") or {}
    projector = (
        "projector not trained"  # (its share gone to the adapters: the reason says why)
        if "skipped" in train
        else f"projector {train.get('steps')} steps in {train.get('seconds')} s"
    )
    print(
        f"\nan answer while the night runs / the same utterance's alone before it: median "
        f"{statistics.median(ratios):.2f}, slower in {sum(r > 1 for r in ratios) / len(ratios):.0%} "
        f"of {len(ratios)}\n"
        f"night: {report['status']} ({report.get('reason')}), {report.get('duration_s')} s "
        f"({night_wall:.0f} s seen by the client), {projector}, "
        f"decoder adapters {decoder.get('steps')} steps ({decoder.get('epochs')} "
        f"epochs) in {decoder.get('train_s')} s, job peak RSS {report.get('peak_rss_mb')} MiB\n"
        f"server peak RSS {server_peak:.0f} MiB; server and job together, sampled after each answer: "
        f"{peak_mib:.0f} MiB at most"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a dev-model build (its tokenizers)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-night-latency"))
    parser.add_argument("--n", type=int, default=20, help="utterances before and after the night")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between utterances")
    parser.add_argument(
        "--adapt-threads", type=int, help="torch threads of the night (default: the server's)"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
