"""Answers at real-size shapes under a CPU quota (`docker run --cpus`), as `eval` times them.

    python benchmarks/cpu_quota.py --model DEV_BUILD [--quota 1] [--n 8] [--work /tmp/bench-cpu-quota]

Needs root and the cgroup v1 `cpu` controller (or cgroup v2 with `cpu` enabled) writable. Builds (or
reuses) the real-size bundle (whisper-base + Qwen2.5-0.5B shapes, random weights), renders `--n`
utterances with espeak-ng, and runs `wyoming-tinyalign eval --path aligned` on them four times: with
`--threads 0` and with `--threads N` (N: the CPUs of this machine, what `--threads 0` gave before it
read the quota), outside a cgroup and inside one holding `--quota` CPUs. Prints a table of the answers'
latency (and the threads each run used, from its log).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

from personalization import real_size_bundle

from wyoming_tinyalign.households import load_households
from wyoming_tinyalign.synth import render_corpus

PERIOD_US = 100_000


def make_cgroup(name: str, quota: float) -> Path:
    """A cgroup under the `cpu` controller's root allowing `quota` CPUs (v1, else v2)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").is_file():
        folder = v1 / name
        folder.mkdir(exist_ok=True)
        (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (folder / "cpu.cfs_quota_us").write_text(str(int(quota * PERIOD_US)))
        return folder
    v2 = Path("/sys/fs/cgroup")
    if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
        raise SystemExit("no writable cgroup cpu controller here (v1 cpu, or v2 with cpu enabled)")
    folder = v2 / name
    folder.mkdir(exist_ok=True)
    (folder / "cpu.max").write_text(f"{int(quota * PERIOD_US)} {PERIOD_US}")
    return folder


def timed_eval(bundle: Path, manifest: Path, threads: int, cgroup: Path | None) -> tuple[dict, str]:
    """`eval`'s JSON and its log, run in `cgroup` (None: where this process is)."""
    command = [sys.executable, "-m", "wyoming_tinyalign", "eval", "--model", str(bundle), "--manifest",
               str(manifest), "--path", "aligned", "--threads", str(threads), "--json"]  # fmt: skip
    join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    done = subprocess.run(command, capture_output=True, text=True, check=True, preexec_fn=join)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a dev-model build (its tokenizers)")
    parser.add_argument("--quota", type=float, default=1.0, help="CPUs the cgroup allows")
    parser.add_argument("--n", type=int, default=8, help="utterances per run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-cpu-quota"))
    args = parser.parse_args()
    bundle = real_size_bundle(args.model, args.work / "real-size-bundle", "combined", 0.1)
    household = next(h for h in load_households() if h.split == "unseen")
    manifest = render_corpus(args.work / "speech", [household], args.n, seed=500)
    cgroup = make_cgroup(f"tinyalign-bench-{os.getpid()}", args.quota)
    cpus = len(os.sched_getaffinity(0))
    print(
        f"{date.today()}, {platform.machine()}, {cpus} CPUs; a cgroup of {args.quota:g} CPUs; {args.n} runs"
    )
    print("| where | --threads | threads used | p50 ms | p95 ms |\n|---|---|---|---|---|")
    try:
        for where, group in (("no quota", None), (f"quota {args.quota:g}", cgroup)):
            for threads in (cpus, 0):
                figures, log = timed_eval(bundle, manifest, threads, group)
                capped = [line.split(": ")[-1] for line in log.splitlines() if "a CPU quota of" in line]
                used = capped[0] if capped else "as asked" if threads else "torch's own"
                p50, p95 = figures["latency_ms_p50"], figures["latency_ms_p95"]
                print(f"| {where} | {threads} | {used} | {p50} | {p95} |")
    finally:
        cgroup.rmdir()


if __name__ == "__main__":
    main()
