"""The Docker image and the `--device cuda` path, checked without Docker and without a GPU.

Docker cannot run on these machines, so nothing here builds an image. What can run outside Docker
does: the Dockerfile's shell steps parse, its torch step takes the right branch for a base image with
and without torch, its ENTRYPOINT/CMD are real `serve` flags, its HEALTHCHECK module exists (and runs
against a real server in test_healthcheck.py). The CUDA path runs here as far as it can: the clear refusal
without CUDA, the choice of precision, and the model in half precision on the CPU. Where a GPU is
present, the last test runs the micro model on it and prints its latency.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from serving import espeak_pcm

from wyoming_tinyalign.__main__ import build_parser, main
from wyoming_tinyalign.audio import pcm_to_float
from wyoming_tinyalign.model.speechllm import PATHS, SpeechLLM
from wyoming_tinyalign.models import inference_dtype

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):  # Docker drops the backslash and the newline
            pending += line.rstrip()[:-1]
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "a continuation line runs off the end"
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(ROOT / "Dockerfile")


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in steps:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def serve_args_of(argv: list[str], env: dict[str, str]):
    old = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("WYOMING_TINYALIGN_")}
    try:
        os.environ.update(env)
        return build_parser().parse_args(argv)
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(old)


# ----------------------------------------------------------------------------------------- Dockerfile
def test_one_dockerfile_for_cpu_and_jetson_multi_stage(steps: list[tuple[str, str]]) -> None:
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]  # the same base: the venv fits the runtime
    build, runtime = stages(steps)
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in build
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    assert not any(k == "RUN" and "pip install" in a for k, a in runtime)  # nothing is built at runtime
    assert ("ARG", "DEVICE=cpu") in runtime
    env = " ".join(a for k, a in runtime if k == "ENV")
    assert "WYOMING_TINYALIGN_DEVICE=${DEVICE}" in env and "HF_HOME=/data/huggingface" in env
    assert ("EXPOSE", "10300") in runtime and ("VOLUME", "/data") in runtime
    (user,) = [a for k, a in runtime if k == "USER"]
    assert user not in ("root", "0")
    assert re.search(rf"useradd .*\b{user}\b", " ".join(a for k, a in runtime if k == "RUN"))
    assert any(k == "RUN" and "espeak-ng" in a for k, a in runtime)  # bootstrap speech synthesis


def test_entrypoint_and_cmd_are_real_serve_flags(steps: list[tuple[str, str]]) -> None:
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    cmd = json.loads(dict(steps)["CMD"])
    assert entry == ["wyoming-tinyalign", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts
    for device in ("cpu", "cuda"):  # WYOMING_TINYALIGN_DEVICE comes from the DEVICE build argument
        args = serve_args_of([entry[1], *cmd], {"WYOMING_TINYALIGN_DEVICE": device})
        assert (args.uri, str(args.data_dir), args.device) == ("tcp://0.0.0.0:10300", "/data", device)


def test_healthcheck_instruction_runs_the_packaged_module(steps: list[tuple[str, str]]) -> None:
    (check,) = [a for k, a in steps if k == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    argv = json.loads(command.strip())  # exec form: no shell needed in the image
    assert argv[:3] == ["python3", "-m", "wyoming_tinyalign.healthcheck"]
    assert importlib.util.find_spec(argv[2]) is not None
    assert "nc " not in check and "grep" not in check


def test_run_steps_parse_and_the_torch_step_takes_the_right_branch(
    steps: list[tuple[str, str]], tmp_path: Path
) -> None:
    runs = [a for k, a in steps if k == "RUN"]
    for script in runs:  # RUN is `/bin/sh -c`
        proc = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, f"{script}\n{proc.stderr}"
    assert subprocess.run(["sh", "-n", "-c", "if then fi"], capture_output=True).returncode != 0
    (torch_step,) = [s for s in runs if "import torch" in s]
    build = dict(a.split("=", 1) for k, a in stages(steps)[0] if k == "ARG")

    def branch(python: str) -> str:
        script = torch_step.replace("/opt/venv/bin/python3", python)
        script = script.replace("/opt/venv/bin/pip install", "echo pip install")
        env = {**os.environ, **build}
        return subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, timeout=TIMEOUT, env=env
        ).stdout.strip()

    # A base image with torch (the Jetson one): torch is not installed again.
    assert branch(shlex.quote(sys.executable)) == "using the base image's torch"
    # A base image without torch (python:3.11-slim): the pinned CPU wheel from the CPU index.
    no_torch = f"{shlex.quote(sys.executable)} -S"  # no site-packages: torch cannot be imported
    assert branch(no_torch) == (
        f"pip install --index-url https://download.pytorch.org/whl/cpu torch=={build['TORCH_VERSION']}"
    )


def test_the_pinned_torch_matches_the_setup_script_and_the_addon(steps: list[tuple[str, str]]) -> None:
    build = dict(a.split("=", 1) for k, a in stages(steps)[0] if k == "ARG")
    assert f"torch=={build['TORCH_VERSION']}" in (ROOT / "script/setup").read_text()
    addon = yaml.safe_load((ROOT / "addon/build.yaml").read_text())
    assert addon["args"]["TORCH_VERSION"] == build["TORCH_VERSION"]


def test_copy_sources_exist_and_pass_the_dockerignore(steps: list[tuple[str, str]]) -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore  # everything else stays out of the build context (venvs, data, models)
    for keyword, args in steps:
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore, f"{source} is excluded by .dockerignore"


def test_compose_examples_for_cpu_and_jetson() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    cpu, jetson = compose["services"]["cpu"], compose["services"]["jetson"]
    assert cpu["build"] == "." and cpu["ports"] == ["10300:10300"] == jetson["ports"]
    assert jetson["runtime"] == "nvidia"
    assert jetson["build"]["args"]["DEVICE"] == "cuda" and "BASE_IMAGE" in jetson["build"]["args"]
    assert jetson["environment"]["WYOMING_TINYALIGN_DEVICE"] == "cuda"
    for service in (cpu, jetson):
        assert any(v.endswith(":/data") for v in service["volumes"])
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    dests = {a.dest.upper() for a in sub.choices["serve"]._actions}
    for name in re.findall(r"WYOMING_TINYALIGN_([A-Z_]+):", text):  # the commented-out ones too
        assert name in dests, f"WYOMING_TINYALIGN_{name} is not a serve flag"


def test_readme_has_the_three_install_sections() -> None:
    readme = (ROOT / "README.md").read_text()
    for heading in ("## Install as a Home Assistant add-on", "## Docker (CPU and Jetson)", "## pip"):
        assert heading in readme, heading


# -------------------------------------------------------------------------------------- --device cuda
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_without_cuda_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WYOMING_TINYALIGN_DEVICE", "cuda")  # as the Jetson image sets it
    for how in (["--device", "cuda"], []):
        assert main(["serve", "--data-dir", str(tmp_path), *how]) == 2
        out, err = capsys.readouterr()
        assert err == "error: --device cuda was asked for, but CUDA is not available here\n" and out == ""
    assert not any(tmp_path.iterdir())  # refused before building or loading anything


def test_half_precision_on_cuda_bfloat16_where_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    assert inference_dtype("cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert inference_dtype("cuda") is torch.bfloat16 and inference_dtype("cuda:1") is torch.bfloat16
    emulated_only = lambda including_emulation=True: including_emulation  # noqa: E731 - pre-Ampere GPUs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert inference_dtype("cuda") is torch.float16
    assert inference_dtype("cuda", "float32") is torch.float32
    assert inference_dtype("cpu", "bfloat16") is torch.bfloat16
    args = serve_args_of(["serve", "--data-dir", "/d", "--dtype", "float16"], {})
    assert args.dtype == "float16"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    pcm, rate = espeak_pcm("turn on the porch light", tmp_path_factory.mktemp("clip"))
    return pcm_to_float(pcm, rate, 2, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_path_runs_in_half_precision(micro_model: Path, clip: np.ndarray, dtype: torch.dtype) -> None:
    """What `--device cuda` loads (backbones in half precision; the small projector stays float32), run
    on the CPU here."""
    model = SpeechLLM.load(micro_model, "cpu", dtype)
    assert model.whisper.dtype == dtype and model.llm.dtype == dtype
    assert next(model.projector.parameters()).dtype == torch.float32
    for path in PATHS:
        result = model.run(clip, path, "areas: front yard; devices: porch light")
        assert result.path == path and isinstance(result.transcript, str)
    model.understand_text("turn on the porch light", "areas: front yard; devices: porch light")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_the_micro_model_on_cuda(micro_model: Path, clip: np.ndarray) -> None:  # pragma: no cover
    dtype = inference_dtype("cuda")
    model = SpeechLLM.load(micro_model, "cuda", dtype)
    assert model.device.type == "cuda" and model.llm.dtype == dtype
    for path in PATHS:
        model.run(clip, path)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            model.run(clip, path)
        torch.cuda.synchronize()
        print(f"cuda {dtype} {path}: {(time.perf_counter() - t0) / 5 * 1000:.1f} ms per utterance")
