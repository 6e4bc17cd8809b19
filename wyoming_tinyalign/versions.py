"""The household's projector versions, and which one is served.

    DATA_DIR/model.json                      the bundle the server serves (written by `serve` at start-up)
    DATA_DIR/projectors/v0001.safetensors    the nights' candidates, numbered in the order they were made;
    DATA_DIR/projectors/v0002.safetensors    each is a full self-describing checkpoint (`save_projector`)
    ...                                      whose `metrics` hold its validation (household, general,
                                             cascade) and, for one its night did not promote, `rejected`;
                                             it may hold Whisper decoder adapters too (the cascade's),
                                             with a memory of the household's corrections
    DATA_DIR/projectors/current              the pointer: `v0002`, or `base` (the bundle's own projector)

A version file is written completely (temporary file, fsync, rename) before the pointer names it, and the
pointer is replaced the same way, so a kill at any moment leaves the pointer naming a complete file (or
no pointer: the bundle's projector). Numbers are never reused. A rejected candidate is kept so that the
household can serve it anyway (`rollback --to`); a plain rollback passes over rejected ones. Pruning keeps
the newest promoted versions, the last night's candidate if it was rejected, and the one being served.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import write_atomic
from .model.bundle import (
    BundleConfig,
    BundleError,
    ProjectorInfo,
    load_bundle_config,
    load_decoder_adapter,
    load_projector,
    read_projector_info,
    save_projector,
)
from .model.decoder_adapter import Adapter, AdapterError, ShapedAdapter
from .model.decoder_memory import CLIPS, DecoderMemory, memory_clips, with_memory
from .model.projector import Projector

_LOGGER = logging.getLogger(__name__)

FOLDER = "projectors"
POINTER = "current"
BASE = "base"
MODEL_FILE = "model.json"
_NAME = re.compile(r"v(\d{4,})")


class VersionError(ValueError):
    """A version that does not exist, does not load, or does not fit the bundle."""


@dataclass(frozen=True)
class Served:
    """What the data dir serves: the version's name (or `base`), its projector and self-description,
    and its Whisper decoder adapters (None: the decoder as built)."""

    name: str
    projector: Projector | None
    info: ProjectorInfo | None
    adapter: ShapedAdapter | None = None


class Versions:
    """Numbered projector versions under `DATA_DIR/projectors` and the pointer to the served one."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = Path(data_dir) / FOLDER

    @property
    def pointer(self) -> Path:
        return self.folder / POINTER

    def path(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise VersionError(f"{name!r} is not a version name (v0001, v0002, ...)")
        return self.folder / f"{name}.safetensors"

    def names(self) -> list[str]:
        """Versions on disk, oldest first (temporary files of an interrupted write are not versions)."""
        if not self.folder.is_dir():
            return []
        found = [p.stem for p in self.folder.glob("v*.safetensors") if _NAME.fullmatch(p.stem)]
        return sorted(found, key=_number)

    def current(self) -> str:
        """The served version's name, or `base` (no pointer yet, or rolled back to the bundle's)."""
        try:
            name = self.pointer.read_text().strip()
        except FileNotFoundError:
            return BASE
        if name != BASE and not _NAME.fullmatch(name):
            raise VersionError(f"{self.pointer} holds {name[:40]!r}, not a version name")
        return name

    def load(self, name: str, device: str = "cpu") -> tuple[Projector, ProjectorInfo]:
        try:
            return load_projector(self.path(name), device)
        except BundleError as err:
            raise VersionError(str(err)) from err

    def adapter(self, name: str, only: Collection[str] | None = None) -> ShapedAdapter | None:
        """A version's Whisper decoder adapters with their shape (None: it has none); with `only`, only
        those of their tensors."""
        try:
            return load_decoder_adapter(self.path(name), only)
        except BundleError as err:
            raise VersionError(str(err)) from err

    def info(self, name: str) -> ProjectorInfo:
        """A version's self-description (its file's header: the weights are not read)."""
        try:
            return read_projector_info(self.path(name))
        except BundleError as err:
            raise VersionError(str(err)) from err

    def rejected(self, name: str) -> bool:
        """Whether `name` is a candidate its night did not promote (one that does not load counts too)."""
        try:
            return "rejected" in self.info(name).metrics
        except VersionError:
            return True

    def add(self, projector: Projector, info: ProjectorInfo, adapter: Adapter | None = None) -> str:
        """Write the next version (with Whisper decoder adapters of `info.decoder`, if any; complete
        before it is visible); the pointer is not touched."""
        self.folder.mkdir(parents=True, exist_ok=True)
        numbers = [_number(n) for n in self.names()]
        with_pointer = self.current()
        if with_pointer != BASE:
            numbers.append(_number(with_pointer))
        name = f"v{max(numbers, default=0) + 1:04d}"
        info.metrics = {**info.metrics, "version": name}
        save_projector(self.path(name), projector, info, adapter)
        _fsync_dir(self.folder)
        return name

    def promote(self, name: str) -> None:
        """Serve `name` (a version, or `base`): one atomic replacement of the pointer file."""
        if name != BASE:
            self.load(name)  # it must load before anything points at it
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.pointer, f"{name}\n".encode())
        _fsync_dir(self.folder)

    def rollback(self, to: str | None = None) -> str:
        """Serve `to` (any version, a rejected candidate too, or `base`); by default the newest promoted
        version older than the served one, or `base` when there is none. Returns the version now pointed
        at."""
        current = self.current()
        if to is None:
            if current == BASE:
                raise VersionError("already serving the bundle's own projector (base); nothing to roll back")
            older = [n for n in self.names() if _number(n) < _number(current) and not self.rejected(n)]
            to = older[-1] if older else BASE
        elif to != BASE and to not in self.names():
            raise VersionError(f"there is no version {to!r}; versions: {', '.join(self.names()) or 'none'}")
        self.promote(to)
        return to

    def prune(self, keep: int) -> list[str]:
        """Delete all but the `keep` newest promoted versions and the last night's candidate if it was
        rejected (newer than every promoted one), never the served one; returns what was deleted."""
        names = self.names()
        current = self.current()
        rejected = [n for n in names if self.rejected(n)]
        promoted = [n for n in names if n not in rejected]
        last = names[-1:] if names and names[-1] in rejected else []
        kept = {current, *promoted[-max(1, keep) :], *last}
        doomed = [n for n in names if n not in kept]
        for name in doomed:
            self.path(name).unlink(missing_ok=True)
        return doomed

    def forget_memory(self, clips: set[str]) -> list[str]:
        """Take the states these clips left out of every version's decoder memory (rewriting each file
        that holds any, atomically; a file's other tensors are read only when it does); returns the
        versions rewritten. A file that cannot be read is left as it is (it cannot be served either),
        and one that cannot be written (a full disk) is said in the log."""
        rewritten = []
        for name in self.names():
            try:
                held = self.adapter(name, only={CLIPS})
                if held is None or clips.isdisjoint(memory_clips(held[0])):
                    continue
                shaped = self.adapter(name)
                memory = DecoderMemory.of(shaped[0]) if shaped is not None else None
                if shaped is None or memory is None:
                    continue
                projector, info = self.load(name)
            except (VersionError, AdapterError) as err:
                _LOGGER.warning("version %s could not be read to forget recordings: %s", name, err)
                continue
            try:
                save_projector(
                    self.path(name), projector, info, with_memory(shaped[0], memory.without(clips))
                )
            except OSError as err:
                _LOGGER.error("version %s still remembers recordings it should forget: %s", name, err)
                continue
            rewritten.append(name)
        return rewritten

    def clean(self) -> None:
        """Remove temporary files left by a write that was killed."""
        if self.folder.is_dir():
            for tmp in self.folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        """Versions with their validation metrics (a rejected candidate's hold `rejected`), the path
        `--path auto` answers on with each (`path_auto`) and, for one with decoder adapters, how many
        corrected recordings its memory keeps words of (`remembers`), for the API."""
        try:
            current = self.current()
        except VersionError:
            current = None
        items = []
        for name in reversed(self.names()):
            entry: dict[str, Any] = {"name": name, "current": name == current}
            try:
                info = self.info(name)
                entry["metrics"], entry["decoder"] = info.metrics, info.decoder is not None
                entry["path_auto"] = auto_path(info)
                if info.decoder is not None:
                    held = self.adapter(name, only={CLIPS})
                    entry["remembers"] = len(memory_clips(held[0])) if held is not None else 0
            except VersionError as err:
                entry["error"] = str(err)
            items.append(entry)
        return {"current": current, "versions": items}


def _number(name: str) -> int:
    match = _NAME.fullmatch(name)
    if match is None:
        raise VersionError(f"{name!r} is not a version name")
    return int(match.group(1))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a power cut, not only a kill)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- fit and day-0
def check_fits(info: ProjectorInfo, cfg: BundleConfig, encoder_dim: int, llm_dim: int) -> None:
    """A projector serves a bundle only when it was aligned to the same encoder and LLM (and fits their
    sizes); raises VersionError otherwise."""
    if (info.encoder, info.llm) != (cfg.encoder, cfg.llm):
        raise VersionError(
            f"it was aligned to {info.encoder} + {info.llm}, but the bundle uses {cfg.encoder} + {cfg.llm}"
        )
    if (info.config.input_dim, info.config.output_dim) != (encoder_dim, llm_dim):
        raise VersionError(
            f"it maps {info.config.input_dim} -> {info.config.output_dim} features, but the bundle's encoder "
            f"and LLM need {encoder_dim} -> {llm_dim}"
        )


def household_validated(info: ProjectorInfo | None) -> bool:
    """Day-0 rule of `--path auto`: a household version whose aligned path beat the cascade it would
    serve by the nightly gate's rule, as the night that made it judged (`gate.path_auto`). Versions
    from before that verdict was kept: held-out intent accuracy at or above the cascade's (WER at or
    below, without intent labels)."""
    if info is None or not info.trained:
        return False
    metrics = info.metrics or {}
    if (beats := metrics.get("aligned_beats_cascade")) is not None:
        return bool(beats)
    household = metrics.get("household") or {}
    cascade = (metrics.get("cascade") or {}).get("household") or {}
    if not household or not cascade:
        return False
    mine, theirs = household.get("intent_accuracy"), cascade.get("intent_accuracy")
    if mine is not None and theirs is not None:
        return mine >= theirs
    if household.get("wer") is not None and cascade.get("wer") is not None:
        return household["wer"] <= cascade["wer"]
    return False


def auto_path(info: ProjectorInfo | None) -> str:
    """The path `--path auto` answers on with a version of `info` (None: the bundle's own projector)."""
    return "aligned" if household_validated(info) else "cascade"


# ------------------------------------------------------------------------------------- the data dir
def record_model(data_dir: Path, folder: Path, name: str) -> None:
    """Remember which bundle this data dir serves (the adaptation job and `eval --data-dir` read it);
    written only when it changes, so a server restarting on a full disk has nothing to write."""
    data_dir.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"folder": str(Path(folder).resolve()), "name": name}, indent=2).encode()
    with suppress(OSError):
        if (data_dir / MODEL_FILE).read_bytes() == record:
            return
    write_atomic(data_dir / MODEL_FILE, record)


def recorded_model(data_dir: Path) -> Path:
    """The bundle folder `serve` recorded for this data dir."""
    path = Path(data_dir) / MODEL_FILE
    try:
        folder = Path(json.loads(path.read_text())["folder"])
    except FileNotFoundError as err:
        raise VersionError(
            f"{data_dir} does not say which model it serves ({MODEL_FILE} is missing): start `serve "
            "--data-dir` once, or pass --model"
        ) from err
    except (ValueError, KeyError, TypeError) as err:
        raise VersionError(f"{path} is not valid: {err}") from err
    load_bundle_config(folder)  # a clear error now if the bundle has gone
    return folder


def served(data_dir: Path, bundle: Path, encoder_dim: int, llm_dim: int, device: str = "cpu") -> Served:
    """The version the pointer names, checked against the bundle. A pointer to `base` (or none) gives
    `Served("base", None, None)`: the bundle's own projector."""
    versions = Versions(data_dir)
    name = versions.current()
    if name == BASE:
        return Served(BASE, None, None)
    projector, info = versions.load(name, device)
    check_fits(info, load_bundle_config(bundle), encoder_dim, llm_dim)
    return Served(name, projector, info, versions.adapter(name))


def load_household_model(
    data_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, bundle: Path | None = None
):
    """The bundle of a data dir with its promoted projector version; returns (SpeechLLM, version name)."""
    from .model.speechllm import SpeechLLM

    bundle = bundle or recorded_model(data_dir)
    model = SpeechLLM.load(bundle, device=device, dtype=dtype)
    current = served(data_dir, bundle, model.encoder.dim, model.llm.config.hidden_size, device)
    if current.projector is not None:
        model.projector, model.projector_info = current.projector, current.info
    if current.adapter is not None:
        model.set_decoder_adapter(*current.adapter)
    return model, current.name
