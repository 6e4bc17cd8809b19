"""Harness for the server tests: the real server as a subprocess, the real `wyoming` client, espeak-ng speech.

Also runnable: `python tests/serving.py tts`, a tiny Wyoming TTS server (prints its port).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from functools import partial
from pathlib import Path

import numpy as np
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize

READY = re.compile(r"ready: serving on (\S+)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, for the web page's tests
WEB = re.compile(r"web: serving the HTTP API on (http://\S+)")
STARTING = re.compile(r"web: a start-up page on (http://\S+)")
PAGE_LINK = re.compile(r"web: the household's page: (http://\S+)")
TIMEOUT = 60.0  # generous: this machine may be busy with training


# --------------------------------------------------------------------------- server subprocess
def file_size_limit(max_bytes: int) -> Callable[[], None]:
    """A `preexec_fn` after which the child cannot grow any file past `max_bytes` (`RLIMIT_FSIZE`): its
    write fails with EFBIG, as one on a full disk fails with ENOSPC (Python ignores SIGXFSZ)."""
    return partial(resource.setrlimit, resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def tear_live_root_page(db: Path) -> None:
    """Tear the interactions table's root page (which every write reads) of a log in use, as a bad block
    would; another connection's checkpoint makes the store's connection read it again."""
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (root,) = other.execute("SELECT rootpage FROM sqlite_master WHERE name = 'interactions'").fetchone()
        (size,) = other.execute("PRAGMA page_size").fetchone()
    with open(db, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(os.urandom(size))


class ServerProcess:
    """`python -m wyoming_tinyalign serve ...` with its log in a file.

    `max_file_bytes`: a disk that refuses to grow any file past that size (`file_size_limit`).
    """

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, max_file_bytes: int | None = None
    ) -> None:
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wyoming_tinyalign", "serve", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log_file,
            env={**os.environ, **(env or {})},
            preexec_fn=None if max_file_bytes is None else file_size_limit(max_file_bytes),
        )  # fmt: skip
        self.uri = ""

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> str:
        """Wait for the "ready" log line; returns the URI served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := READY.search(self.text):
                self.uri = match.group(1)
                return self.uri
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.text[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.text[-3000:]}")

    def wait_log(self, pattern: re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait for a log line matching `pattern` (e.g. `WEB`, `PAGE_LINK`)."""
        deadline = time.monotonic() + timeout
        while not (match := pattern.search(self.text)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"no {pattern.pattern!r} in the server log:\n{self.text[-3000:]}")
            time.sleep(0.05)
        return match

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.uri.removeprefix("tcp://").rsplit(":", 1)
        return host, int(port)

    def stop(self, timeout: float = TIMEOUT) -> int:
        """SIGTERM, wait; kill if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_args(model: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data-dir", str(data_dir), "--threads", "1", *extra]


# --------------------------------------------------------------------------- audio
def espeak_pcm(text: str, work: Path, voice: str = "en-us") -> tuple[bytes, int]:
    """espeak-ng speech as 16-bit mono PCM at its native rate (22050 Hz)."""
    out = work / f"espeak-{abs(hash((text, voice)))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), text], check=True, timeout=TIMEOUT)
    with wave.open(str(out), "rb") as wav:
        assert wav.getsampwidth() == 2 and wav.getnchannels() == 1
        return wav.readframes(wav.getnframes()), wav.getframerate()


def resample(pcm: bytes, rate: int, to_rate: int) -> bytes:
    return AudioChunkConverter(rate=to_rate).convert(AudioChunk(rate, 2, 1, pcm)).audio


def stereo_left(pcm: bytes) -> bytes:
    """16-bit mono -> stereo with the speech on the left and silence on the right."""
    mono = np.frombuffer(pcm, "<i2")
    return np.stack([mono, np.zeros_like(mono)], axis=1).astype("<i2").tobytes()


def fit_seconds(pcm: bytes, rate: int, seconds: float) -> bytes:
    """Repeat (or cut) 16-bit mono PCM to exactly `seconds`."""
    need = int(seconds * rate) * 2
    return (pcm * math.ceil(need / max(len(pcm), 1)))[:need]


# --------------------------------------------------------------------------- client side
def client(host: str, port: int) -> AsyncTcpClient:
    return AsyncTcpClient(host, port, connect_timeout=TIMEOUT, read_timeout=TIMEOUT)


async def send_audio(
    c: AsyncTcpClient, pcm: bytes, rate: int, width: int = 2, channels: int = 1, chunk_s: float = 0.1
) -> None:
    """audio-start, audio-chunk*, audio-stop (not paced: as fast as the socket takes it)."""
    step = max(width * channels, int(rate * chunk_s) * width * channels)
    await c.write_event(AudioStart(rate, width, channels).event())
    for i in range(0, len(pcm), step):
        await c.write_event(AudioChunk(rate, width, channels, pcm[i : i + step]).event())
    await c.write_event(AudioStop().event())


async def read_until(c: AsyncTcpClient, *types: str) -> list[Event]:
    """Events up to and including the first of `types` (or an error); fails if the server closes first."""
    events: list[Event] = []
    while True:
        event = await c.read_event()
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in types or event.type == "error":
            return events


async def transcribe(
    host: str,
    port: int,
    pcm: bytes,
    rate: int,
    width: int = 2,
    channels: int = 1,
    tag: str | None = None,
    context: dict | None = None,
) -> tuple[list[Event], float]:
    """One ASR request (`tag` and `context`, e.g. a `satellite_id`, go in its context, and so in the
    log); returns the events up to `transcript` and the end-of-speech (audio-stop sent) -> transcript
    seconds."""
    context = {**(context or {}), **({"tag": tag} if tag else {})}
    async with client(host, port) as c:
        await c.write_event(Transcribe(language="en", context=context or None).event())
        await send_audio(c, pcm, rate, width, channels)
        t0 = time.perf_counter()
        events = await read_until(c, "transcript")
        return events, time.perf_counter() - t0


def say_all(host: str, port: int, work: Path, said: list[tuple[str, ...]]) -> None:
    """Speak each `(text, satellite[, voice])` to the server as a satellite would, one after another (in
    a thread with its own event loop, so it works whatever runs in the caller's)."""

    async def run() -> None:
        for text, satellite, *voice in said:
            pcm, rate = espeak_pcm(text, work, *voice)
            await transcribe(host, port, pcm, rate, context={"satellite_id": satellite})

    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, run()).result()


async def describe_rtt(host: str, port: int) -> tuple[Info, float]:
    """Connect, describe, read info: what Home Assistant does (it allows 1 s)."""
    t0 = time.perf_counter()
    async with client(host, port) as c:
        await c.write_event(Describe().event())
        (event,) = await read_until(c, "info")
    return Info.from_event(event), time.perf_counter() - t0


async def describe_under_load(
    host: str, port: int, long_pcm: bytes, rate: int, loaders: int = 4
) -> tuple[list[float], int]:
    """Describe round trips measured while other clients' long utterances are being inferred.

    `loaders` clients each send `long_pcm` and wait for the transcript. A describe counts when, for its
    whole round trip, some loader had sent audio-stop and not yet received its transcript. Returns those
    round trips (seconds) and how many describes were measured in all.
    """
    waiting: list[tuple[float, float]] = []  # (audio-stop sent, transcript received) per loader

    async def load() -> None:
        async with client(host, port) as c:
            await c.write_event(Transcribe(language="en").event())
            await send_audio(c, long_pcm, rate)
            sent = time.perf_counter()
            await read_until(c, "transcript")
            waiting.append((sent, time.perf_counter()))

    tasks = [asyncio.create_task(load()) for _ in range(loaders)]
    spans: list[tuple[float, float]] = []
    while len(waiting) < loaders:
        t0 = time.perf_counter()
        await describe_rtt(host, port)
        spans.append((t0, time.perf_counter()))
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    during = [t1 - t0 for t0, t1 in spans if any(s <= t0 and t1 <= r for s, r in waiting)]
    return during, len(spans)


# --------------------------------------------------------------------------- fake TTS server
class _SineTts(AsyncEventHandler):
    """Answers `synthesize` with 16 kHz audio: 10 ms of a 440 Hz tone per character of text."""

    async def handle_event(self, event: Event) -> bool:
        if Synthesize.is_type(event.type):
            text = Synthesize.from_event(event).text
            t = np.arange(160 * max(1, len(text))) / 16000
            pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
            await self.write_event(AudioStart(16000, 2, 1).event())
            for i in range(0, len(pcm), 3200):
                await self.write_event(AudioChunk(16000, 2, 1, pcm[i : i + 3200]).event())
            await self.write_event(AudioStop().event())
        return True


async def _run_tts() -> None:
    server = await asyncio.start_server(lambda r, w: _SineTts(r, w).run(), host="127.0.0.1", port=0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def start_tts() -> tuple[subprocess.Popen, int]:
    """The fake TTS server as a subprocess; returns it and its port."""
    proc = subprocess.Popen([sys.executable, __file__, "tts"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tts")
    parser.parse_args()
    asyncio.run(_run_tts())


if __name__ == "__main__":
    main()
