"""What `serve --model` names: a bundle folder, `dev` (the offline demo model), or a preset of hub ids.

- `dev`: the `small` offline development model, built once into `DATA_DIR/models/dev-small`. It is built
  in a temporary sibling folder and renamed into place when complete, so a killed first run never leaves
  half a bundle behind.
- `preset:<name>`: real backbones by Hugging Face hub id, with no projector yet (the `cascade` path).
  `from_pretrained` reads the local cache, so it works offline once the models are cached.

A demo build stopped part-way while the server serves another model is kept for `STOPPED_BUILD_KEEP_DAYS`
after its last write (`--model dev` goes on with it), then deleted (`sweep_stopped_builds`): its rendered
speech alone is about a gigabyte (972 MB measured), its encoder features more.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import building_folder, stopped_builds
from .model.bundle import BundleConfig, BundleError, load_bundle_config, save_bundle_config
from .model.prompt import DEFAULT_TEMPLATE
from .model.speechllm import SpeechLLM

_LOGGER = logging.getLogger(__name__)

DEV = "dev"
DEV_SIZE = "small"
PRESET_PREFIX = "preset:"
PRESETS: dict[str, tuple[str, str]] = {
    "whisper-base+qwen2.5-0.5b": ("openai/whisper-base", "Qwen/Qwen2.5-0.5B-Instruct"),
    "whisper-small+qwen2.5-1.5b": ("openai/whisper-small", "Qwen/Qwen2.5-1.5B-Instruct"),
}
Builder = Callable[[Path, str], object]
STOPPED_BUILD_KEEP_DAYS = 7.0


@dataclass(frozen=True)
class ModelChoice:
    """A resolved `--model`: the bundle folder, a display name, and whether it is the demo model."""

    folder: Path
    name: str
    demo: bool = False
    preset: str | None = None


def resolve_model(spec: str, data_dir: Path, build: Builder | None = None) -> ModelChoice:
    """Turn `--model` into a bundle folder, building the dev model or writing a preset bundle as needed."""
    if spec == DEV:
        folder = ensure_dev_model(data_dir / "models" / f"dev-{DEV_SIZE}", build)
        return ModelChoice(folder, f"dev-{DEV_SIZE}", demo=True)
    if spec.startswith(PRESET_PREFIX):
        name = spec[len(PRESET_PREFIX) :]
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        encoder, llm = PRESETS[name]
        folder = data_dir / "models" / f"preset-{name}"
        save_bundle_config(
            folder,
            BundleConfig(
                encoder=encoder,
                llm=llm,
                prompt_template=DEFAULT_TEMPLATE,
                projector=None,
                cascade_pad_30s=True,
                metadata={"preset": name},
            ),
        )
        return ModelChoice(folder, name, preset=name)
    folder = Path(spec)
    load_bundle_config(folder)  # a clear error now if it is not a bundle
    return ModelChoice(folder, folder.resolve().name)


def ensure_dev_model(folder: Path, build: Builder | None = None) -> Path:
    """Build the dev model into `folder` once; a half-built attempt is never taken for a bundle. One
    stopped part-way (its process is gone) goes on where it was (`devmodel.build_dev_model`)."""
    if (folder / "bundle.json").is_file():
        return folder
    if build is None:
        from .devmodel import build_dev_model as build
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = building_folder(folder, os.getpid())
    *older, newest = sorted(stopped_builds(folder), key=lambda path: path.stat().st_mtime) or [None]
    for path in older:
        _LOGGER.info("removing an unfinished build: %s", path)
        shutil.rmtree(path, ignore_errors=True)
    if newest is not None:
        os.replace(newest, tmp)  # the same folder if this process has the number the stopped one had
        _LOGGER.warning("going on with the DEMO model build that stopped part-way; progress follows")
    else:
        _LOGGER.warning(
            "building the offline DEMO model into %s (once; 1 to 2 hours on 2 cores); progress follows",
            folder,
        )
    try:
        build(tmp, DEV_SIZE)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM while the server loads (`serve.run_serve`)
        _LOGGER.warning("the DEMO model build stopped; the next start goes on from where it was")
        raise
    if folder.exists():  # an empty or broken leftover without bundle.json
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    _LOGGER.info("demo model ready in %s", folder)
    return folder


def sweep_stopped_builds(models: Path, now: float | None = None) -> None:
    """Delete the demo builds under `models` that stopped part-way and have not been written to for
    `STOPPED_BUILD_KEEP_DAYS`; say which are kept until then. Called when another model serves: a build
    another server runs now is left alone, and a folder that cannot be read or deleted only logged."""
    now = time.time() if now is None else now
    for path in stopped_builds(models / "*"):
        try:
            files = [info for entry in path.rglob("*") if stat.S_ISREG((info := entry.lstat()).st_mode)]
            size_mb = sum(f.st_size for f in files) / 2**20
            idle_days = (now - max((f.st_mtime for f in files), default=path.stat().st_mtime)) / 86400
            if idle_days < STOPPED_BUILD_KEEP_DAYS:
                _LOGGER.warning(
                    "a DEMO model build stopped part-way %.1f days ago is kept in %s (%.0f MB): a start "
                    "with --model dev goes on with it; unused, it is deleted %.0f days after it stopped",
                    idle_days, path, size_mb, STOPPED_BUILD_KEEP_DAYS,
                )  # fmt: skip
                continue
            shutil.rmtree(path)
        except OSError as err:
            _LOGGER.warning("could not look at or delete the stopped DEMO model build %s: %s", path, err)
            continue
        _LOGGER.info(
            "deleted the DEMO model build stopped part-way %.0f days ago (%.0f MB freed): %s",
            idle_days, size_mb, path.name,
        )  # fmt: skip


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """`--dtype`, shared by `serve`, `adapt` and `eval` (the nightly job runs at the server's)."""
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto",
        help="backbone precision; auto: float32 on cpu, bfloat16 (or float16) on cuda",
    )  # fmt: skip


def inference_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """`--dtype`: auto is float32 on the CPU and half precision on CUDA: bfloat16 where the GPU has it
    (Ampere and later, e.g. Jetson Orin), float16 otherwise (bfloat16 emulated on older GPUs is slow)."""
    if requested != "auto":
        return DTYPES[requested]
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def load_model(choice: ModelChoice, device: str, dtype: torch.dtype = torch.float32) -> SpeechLLM:
    """Load the bundle; a preset that is neither cached nor downloadable fails with one clear line."""
    if choice.preset is not None:
        _LOGGER.info(
            "loading the model %s: %s and %s, from the Hugging Face hub the first time (then its cache)",
            choice.name, *PRESETS[choice.preset],
        )  # fmt: skip
    else:
        _LOGGER.info("loading the model %s from %s", choice.name, choice.folder)
    try:
        return SpeechLLM.load(choice.folder, device=device, dtype=dtype)
    except BundleError as err:
        if choice.preset is None:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        encoder, llm = PRESETS[choice.preset]
        raise BundleError(
            f"model preset {choice.preset!r} needs {encoder} and {llm}: they are not in the local Hugging "
            f"Face cache ({HF_HUB_CACHE}) and the hub cannot be reached; run once with network access, "
            "or set HF_HOME to a cache that has them"
        ) from err


def projector_version(folder: Path) -> str | None:
    """A short content hash of the bundle's projector weights (None when it has none)."""
    cfg = load_bundle_config(folder)
    if not cfg.projector or not (folder / cfg.projector).is_file():
        return None
    digest = hashlib.sha256()
    with open(folder / cfg.projector, "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
