"""Render a speech corpus of household commands with espeak-ng.

Every utterance is seeded on its own (``seed``, household, index), so the same seed gives
byte-identical WAV files and manifest whatever the number of jobs.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import subprocess
import sys
import threading
import time
import wave
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import TARGET_RATE, decode_wav, write_wav
from .corpus import Command, generate_commands
from .households import Household, Speaker, load_households
from .manifest import Utterance, read_manifest, write_manifest

_LOGGER = logging.getLogger(__name__)

SPLITS = ("base", "unseen", "all")
_PAD_S = (0.05, 0.3)  # random leading and trailing silence


@dataclass(frozen=True)
class _Job:
    household: str
    index: int
    command: Command
    speaker: Speaker

    @property
    def audio(self) -> Path:
        return Path("wavs", self.household, f"{self.index:05d}.wav")


def render_corpus(
    out_dir: Path,
    households: list[Household],
    n: int,
    seed: int,
    *,
    rate: int = TARGET_RATE,
    width: int = 2,
    channels: int = 1,
    jobs: int = 2,
) -> Path:
    """Render ``n`` commands spread over ``households``; returns the path of ``manifest.jsonl``."""
    if seed < 0 or not households:
        raise ValueError(f"need a seed >= 0 (got {seed}) and at least one household")
    plan: list[_Job] = []
    for i, household in enumerate(households):
        if not household.speakers:
            raise ValueError(f"household {household.name!r} has no speakers")
        rng = random.Random(f"{seed}/{household.name}")
        count = n // len(households) + int(i < n % len(households))
        first = rng.randrange(len(household.speakers))
        for index, command in enumerate(generate_commands(household, count, rng)):
            speaker = household.speakers[(first + index) % len(household.speakers)]
            plan.append(_Job(household.name, index, command, speaker))
        (out_dir / "wavs" / household.name).mkdir(parents=True, exist_ok=True)

    def render(job: _Job) -> None:
        audio = _speak(job, seed)
        write_wav(out_dir / job.audio, audio, rate=rate, width=width, channels=channels)

    _run_each(plan, render, jobs)
    manifest = out_dir / "manifest.jsonl"
    utterances = [
        Utterance(job.audio, job.command.text, job.command.intent, job.speaker.id, job.household)
        for job in plan
    ]
    write_manifest(manifest, utterances)
    return manifest


def _run_each(items: Iterable[_Job], work: Callable[[_Job], None], threads: int) -> None:
    """``work`` on every item, in ``threads`` threads that each take the next item when free. Nothing is
    queued ahead, so a stop (Ctrl-C, or the server's SIGTERM raised the same way) waits only for the
    items in hand; the first error stops the others and is raised here."""
    pending = iter(items)
    take = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            with take:
                item = next(pending, None)
            if item is None:
                return
            try:
                work(item)
            except BaseException as err:  # handed to the caller's thread below
                errors.append(err)
                stop.set()

    started: list[threading.Thread] = []
    try:
        for i in range(max(1, threads)):
            thread = threading.Thread(target=loop, name=f"render-{i}", daemon=True)  # never holds up an exit
            thread.start()
            started.append(thread)
        for thread in started:
            while thread.is_alive():  # a timed wait: a stop signal caught by another thread is raised here
                thread.join(0.2)
    finally:
        stop.set()
        for thread in started:
            thread.join()
    if errors:
        raise errors[0]


def render_once(out_dir: Path, households: list[Household], n: int, seed: int) -> Path:
    """`render_corpus` into `out_dir` unless it was rendered whole there before (its manifest is written
    last, after every clip: present means complete); a folder left part-way is rendered afresh."""
    manifest = out_dir / "manifest.jsonl"
    if not manifest.is_file():
        _LOGGER.info("rendering %d utterances of synthetic speech into %s", n, out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        render_corpus(out_dir, households, n, seed)
    return manifest


def _speak(job: _Job, seed: int) -> np.ndarray:
    """espeak-ng speech with seeded silence padding and white noise at the speaker's SNR."""
    speaker = job.speaker
    cmd = ["espeak-ng", "-v", speaker.voice, "-s", str(speaker.speed), "-p", str(speaker.pitch), "--stdout"]
    proc = subprocess.run([*cmd, job.command.text], capture_output=True, check=False)
    if proc.returncode != 0:
        error = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"espeak-ng failed for voice {speaker.voice!r}: {error}")
    speech = decode_wav(proc.stdout, f"espeak-ng -v {speaker.voice}")
    rng = np.random.default_rng([seed, zlib.crc32(job.household.encode()), job.index])
    lead, trail = (int(s * TARGET_RATE) for s in rng.uniform(*_PAD_S, size=2))
    audio = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(trail, np.float32)])
    if speaker.noise_snr_db is not None and speech.size:
        noise_power = float(np.mean(speech.astype(np.float64) ** 2)) / 10 ** (speaker.noise_snr_db / 10)
        audio += rng.standard_normal(audio.size, dtype=np.float32) * np.float32(np.sqrt(noise_power))
    return audio


def add_synth_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``wyoming-tinyalign synth``."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl, wavs/)")
    parser.add_argument("--households", type=Path, help="households JSON (default: the packaged one)")
    parser.add_argument("--split", choices=SPLITS, default="all", help="which households to render")
    parser.add_argument("--n", type=int, default=200, help="number of utterances")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--rate", type=int, default=TARGET_RATE, help="WAV sample rate")
    parser.add_argument("--width", type=int, choices=(1, 2, 3, 4), default=2, help="WAV bytes per sample")
    parser.add_argument("--channels", type=int, choices=(1, 2), default=1, help="WAV channels")
    parser.add_argument("--jobs", type=int, default=2, help="concurrent espeak-ng processes")


def run_synth(args: argparse.Namespace) -> int:
    """Run ``synth``: render the corpus and print a one-line summary."""
    if args.n < 1 or args.seed < 0 or args.rate < 1000 or args.jobs < 1:
        print("synth: --n and --jobs must be >= 1, --seed >= 0, --rate >= 1000", file=sys.stderr)
        return 2
    try:
        households = load_households(args.households)
    except (OSError, ValueError) as err:
        print(f"synth: {err}", file=sys.stderr)
        return 2
    if args.split != "all":
        households = [h for h in households if h.split == args.split]
    if not households:
        print(f"synth: no households in split {args.split!r}", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        manifest = render_corpus(
            args.out,
            households,
            args.n,
            args.seed,
            rate=args.rate,
            width=args.width,
            channels=args.channels,
            jobs=args.jobs,
        )
    except (OSError, RuntimeError) as err:
        print(f"synth: {err}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - start
    seconds = 0.0
    for utt in read_manifest(manifest):
        with wave.open(str(utt.audio)) as wav:
            seconds += wav.getnframes() / wav.getframerate()
    print(f"synth: {args.n} utterances, {seconds:.1f} s of audio in {elapsed:.1f} s -> {manifest}")
    return 0
