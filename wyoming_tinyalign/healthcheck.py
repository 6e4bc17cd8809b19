"""Container health check: a real Wyoming `describe` -> `info` round trip with the `wyoming` client.

    python -m wyoming_tinyalign.healthcheck [--uri tcp://127.0.0.1:10300] [--timeout 3]

Exit 0 when the server answers `describe` with an `info` that has an ASR program, 1 otherwise (closed
port, no answer in time, a wrong answer). Used by the Docker `HEALTHCHECK` and by the add-on's discovery
step, which publishes the server to Home Assistant only once it answers. Without `--uri` it checks the
server `WYOMING_TINYALIGN_URI` configures (0.0.0.0 read as 127.0.0.1), else tcp://127.0.0.1:10300.

With `--data-dir` (the `HEALTHCHECK`s) a server that does not answer yet because it is building the demo
model there passes too: a first build on a slow machine outlasts any start period, and Home Assistant's
watchdog would restart an unhealthy add-on, and the build with it, from the beginning, again and again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from wyoming.client import AsyncClient
from wyoming.info import Describe, Info

from .files import live_builds

DEFAULT_URI = "tcp://127.0.0.1:10300"


def local_uri(serve_uri: str | None) -> str:
    """The URI a local client uses to reach a server listening on `serve_uri`."""
    if not serve_uri:
        return DEFAULT_URI
    parts = urlsplit(serve_uri)
    if parts.scheme == "tcp" and parts.hostname in ("0.0.0.0", "", None, "::"):
        return f"tcp://127.0.0.1:{parts.port or 10300}"
    return serve_uri


async def describe(uri: str, timeout: float) -> Info:
    """Connect, send `describe`, return the `info` answer; raises on anything else."""
    async with asyncio.timeout(timeout), AsyncClient.from_uri(uri) as client:
        await client.write_event(Describe().event())
        while True:  # bounded by the timeout
            event = await client.read_event()
            if event is None:
                raise ConnectionError("the server closed the connection without answering")
            if Info.is_type(event.type):
                return Info.from_event(event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wyoming_tinyalign.healthcheck", description=__doc__)
    parser.add_argument("--uri", default=local_uri(os.environ.get("WYOMING_TINYALIGN_URI")))
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole round trip")
    parser.add_argument(
        "--data-dir", type=Path, help="the server's data dir: a model a server process builds there passes"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        info = asyncio.run(describe(args.uri, args.timeout))
    except (OSError, ValueError) as err:  # no answer in time (TimeoutError), refused, reset, bad URI or event
        builds = live_builds(args.data_dir / "models") if args.data_dir else []
        if builds:
            (folder, pid), *_ = builds
            print(f"healthy: not answering yet, process {pid} is building a model in {folder}")
            return 0
        why = f"no info within {args.timeout:g} s" if isinstance(err, TimeoutError) else str(err)
        print(f"unhealthy: {args.uri}: {why}", file=sys.stderr)
        return 1
    if not info.asr:
        print(f"unhealthy: {args.uri} answered info without an ASR program", file=sys.stderr)
        return 1
    model = info.asr[0].models[0].name if info.asr[0].models else "?"
    print(
        f"healthy: {info.asr[0].name} ({model}) at {args.uri} in {(time.perf_counter() - t0) * 1000:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
