"""`python -m wyoming_tinyalign.healthcheck`: a real describe -> info round trip, as the Docker image's and
the add-on's HEALTHCHECK run it, against the running server, a closed port and servers that misbehave."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import TIMEOUT, ServerProcess, free_port, serve_args

from wyoming_tinyalign.healthcheck import DEFAULT_URI, local_uri

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def uri(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("healthcheck")
    server = ServerProcess(
        serve_args(micro_model, work / "data", "--uri", "tcp://127.0.0.1:0", "--no-log"),
        work / "server.log",
        env={"WYOMING_TINYALIGN_WEB_PORT": "off"},  # no web API on its fixed port (ignored without the flag)
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wyoming_tinyalign.healthcheck", *args],
        capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_healthy_against_the_running_server(uri: str) -> None:
    proc = healthcheck("--uri", uri, "--timeout", "10")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rf"healthy: tinyalign \(\S+\) at {re.escape(uri)} in \d+ ms\n", proc.stdout)


def test_the_healthcheck_commands_of_both_images_as_written(uri: str) -> None:
    """The HEALTHCHECK lines of the Dockerfile (exec form) and the add-on (shell form), port aside."""
    docker = (ROOT / "Dockerfile").read_text()
    argv = json.loads(re.search(r"^\s*CMD (\[.*\])$", docker.split("HEALTHCHECK", 1)[1], re.M).group(1))
    assert argv[:3] == ["python3", "-m", "wyoming_tinyalign.healthcheck"]
    argv = [sys.executable, *argv[1:]]
    assert "tcp://127.0.0.1:10300" in argv
    running = [uri if a == "tcp://127.0.0.1:10300" else a for a in argv]
    assert subprocess.run(running, capture_output=True, timeout=TIMEOUT).returncode == 0
    port = free_port()
    closed = [f"tcp://127.0.0.1:{port}" if a == "tcp://127.0.0.1:10300" else a for a in argv]
    assert subprocess.run(closed, capture_output=True, timeout=TIMEOUT).returncode == 1

    addon = (ROOT / "addon/Dockerfile").read_text().replace("\\\n", " ")
    shell = re.search(r"HEALTHCHECK .*? CMD (.*)$", addon, re.M).group(1).strip()
    assert shell.startswith("python3 -m wyoming_tinyalign.healthcheck")
    shell = shell.replace("python3", shlex.quote(sys.executable), 1)
    for target, code in ((uri, 0), (f"tcp://127.0.0.1:{port}", 1)):
        command = shell.replace("tcp://127.0.0.1:10300", target)
        assert subprocess.run(["sh", "-c", command], capture_output=True, timeout=TIMEOUT).returncode == code


def test_a_closed_port_is_unhealthy_at_once() -> None:
    t0 = time.monotonic()
    proc = healthcheck("--uri", f"tcp://127.0.0.1:{free_port()}", "--timeout", "3")
    assert proc.returncode == 1 and proc.stderr.startswith("unhealthy:") and proc.stdout == ""
    assert time.monotonic() - t0 < TIMEOUT


def test_a_server_that_never_answers_is_unhealthy_after_the_timeout() -> None:
    with socket.socket() as listener:  # connections complete in the backlog; nobody answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        t0 = time.monotonic()
        proc = healthcheck("--uri", f"tcp://127.0.0.1:{listener.getsockname()[1]}", "--timeout", "1")
        elapsed = time.monotonic() - t0
    assert proc.returncode == 1 and "within 1 s" in proc.stderr
    assert elapsed < 1 + 10  # the timeout, plus starting Python on a busy machine


def test_a_server_building_the_demo_model_passes_with_its_data_dir(tmp_path: Path) -> None:
    """A first start that builds the demo model for hours does not answer yet: with `--data-dir` (the
    images' HEALTHCHECKs) that passes while the server's process builds, so that Home Assistant's watchdog
    does not restart it; without (the add-on's discovery step) it does not; once the process is gone (a
    kill leaves its folder), it does not either."""
    slow_build = (  # the server's own ensure_dev_model, with a build that takes its time
        "import sys, time; from pathlib import Path; from wyoming_tinyalign.models import ensure_dev_model; "
        "ensure_dev_model(Path(sys.argv[1]), build=lambda tmp, size: (tmp.mkdir(), time.sleep(300)))"
    )
    builder = subprocess.Popen([sys.executable, "-c", slow_build, str(tmp_path / "models" / "dev-small")])
    closed = f"tcp://127.0.0.1:{free_port()}"
    try:
        folder = tmp_path / "models" / f".dev-small.building-{builder.pid}"
        deadline = time.monotonic() + TIMEOUT
        while not folder.is_dir():
            assert builder.poll() is None and time.monotonic() < deadline, "the build did not start"
            time.sleep(0.1)
        building = healthcheck("--uri", closed, "--data-dir", str(tmp_path))
        strict = healthcheck("--uri", closed)
    finally:
        builder.kill()
        builder.wait(TIMEOUT)
    after = healthcheck("--uri", closed, "--data-dir", str(tmp_path))
    assert building.returncode == 0, building.stderr
    said = f"healthy: not answering yet, process {builder.pid} is building a model in {folder}\n"
    assert building.stdout == said
    assert strict.returncode == 1 and strict.stderr.startswith(f"unhealthy: {closed}: ")
    assert folder.is_dir() and after.returncode == 1 and after.stderr.startswith("unhealthy:")


@pytest.mark.parametrize("reply", [b"", b'{"type": "pong"}\n', b"not wyoming\n"])
def test_a_wrong_answer_is_unhealthy(reply: bytes) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def answer() -> None:
            listener.settimeout(TIMEOUT)
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        proc = healthcheck("--uri", f"tcp://127.0.0.1:{listener.getsockname()[1]}", "--timeout", "5")
        thread.join(TIMEOUT)
    assert proc.returncode == 1 and proc.stderr.startswith("unhealthy:"), proc.stderr


def test_without_uri_it_checks_the_server_the_environment_configures(uri: str) -> None:
    port = uri.rsplit(":", 1)[1]
    proc = healthcheck(env={"WYOMING_TINYALIGN_URI": f"tcp://0.0.0.0:{port}"})
    assert proc.returncode == 0, proc.stderr
    assert local_uri(None) == DEFAULT_URI == local_uri("")
    assert local_uri("tcp://0.0.0.0:10400") == "tcp://127.0.0.1:10400"
    assert local_uri("tcp://192.168.1.5:10300") == "tcp://192.168.1.5:10300"
    assert local_uri("unix:///run/tinyalign.sock") == "unix:///run/tinyalign.sock"
