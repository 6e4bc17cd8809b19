"""The one inference thread: every model call of the server runs here, one at a time, in arrival order.

The event loop never runs the model (nor converts audio): it submits a job and awaits an asyncio future.
A job still waiting in the queue is dropped when its caller goes away (the future is cancelled).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .audio import pcm_to_float
from .intents import Intent
from .model.bundle import ProjectorInfo
from .model.decoder_adapter import ShapedAdapter
from .model.decoder_memory import with_memory
from .model.projector import Projector
from .model.speechllm import PATHS, Result, SpeechLLM
from .versions import auto_path
from .words import counted

_LOGGER = logging.getLogger(__name__)

PATH_CHOICES = ("auto", *PATHS)
T = TypeVar("T")


@dataclass(frozen=True)
class PcmSegment:
    """Raw PCM in one format, as it arrived (consecutive chunks of the same format are joined)."""

    rate: int
    width: int
    channels: int
    pcm: bytes


def choose_path(requested: str, model: SpeechLLM) -> str:
    """`auto` is `aligned` once a household version has been promoted whose aligned path beats the
    cascade on the household's held-out utterances (`versions.household_validated`), `cascade` before."""
    if requested == "auto":
        return auto_path(model.projector_info)
    if requested not in PATHS:
        raise ValueError(f"unknown path {requested!r}; expected one of {', '.join(PATH_CHOICES)}")
    if requested != "cascade" and model.projector is None:
        raise ValueError(f"--path {requested} needs a bundle with a projector; this one has none")
    return requested


def segments_to_float(segments: list[PcmSegment]) -> np.ndarray:
    """All segments as float32 mono 16 kHz, through `audio.pcm_to_float` (the one conversion path)."""
    parts = [pcm_to_float(s.pcm, s.rate, s.width, s.channels) for s in segments if s.pcm]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


class InferenceWorker:
    """Owns the shared model and the single inference thread with its FIFO queue."""

    def __init__(self, model: SpeechLLM, path: str = "auto") -> None:
        self.model = model
        self.requested_path = path
        self.path = choose_path(path, model)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Jobs submitted and not finished (queued or running)."""
        return self._waiting

    async def _submit(self, fn: Callable[..., T], *args: object) -> T:
        self._waiting += 1
        _LOGGER.debug("inference job queued (%d waiting)", self._waiting)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._waiting -= 1

    async def transcribe(
        self, segments: list[PcmSegment], context: str, language: str | None
    ) -> tuple[np.ndarray, Result]:
        """Convert the PCM and run the model on it; returns the 16 kHz audio and the result."""
        return await self._submit(self._transcribe, segments, context, language)

    def _transcribe(
        self, segments: list[PcmSegment], context: str, language: str | None
    ) -> tuple[np.ndarray, Result]:
        audio = segments_to_float(segments)
        return audio, self.model.run(audio, self.path, context, language)

    async def understand(self, text: str, context: str) -> Intent | None:
        """Text -> intent with the LLM."""
        return await self._submit(self.model.understand_text, text, context)

    def replace_projector(
        self, projector: Projector | None, info: ProjectorInfo | None, adapter: ShapedAdapter | None = None
    ) -> str:
        """Serve another projector and Whisper decoder adapters (None: the decoder as built), and
        re-choose an `auto` path; returns the path now served. Call it on the inference thread
        (`swap_projector`) or before serving starts."""
        model = self.model
        before = model.projector, model.projector_info
        model.projector = projector.eval() if projector is not None else None
        model.projector_info = info
        try:
            path = choose_path(self.requested_path, model)
            if adapter is None:
                model.set_decoder_adapter(None)
            else:  # checked whole before a weight changes
                model.set_decoder_adapter(*adapter)
        except ValueError:  # --path aligned and no projector, adapters that do not fit: keep the old
            model.projector, model.projector_info = before
            raise
        self.path = path
        return path

    async def swap_projector(
        self, projector: Projector | None, info: ProjectorInfo | None, adapter: ShapedAdapter | None = None
    ) -> str:
        """Hot-swap between requests: queued like a request, so every request runs wholly on the old
        version or wholly on the new one."""
        return await self._submit(self.replace_projector, projector, info, adapter)

    def forget_memory(self, clips: set[str]) -> None:
        """Take these clips' states out of the served decoder memory, between requests: queued like a
        request (from any thread; it returns at once, and the next request runs without them)."""
        with suppress(RuntimeError):  # (closed: nothing is served any more)
            self._executor.submit(self._forget_memory, clips)

    def _forget_memory(self, clips: set[str]) -> None:
        model = self.model
        memory = model.decoder_memory
        if model.decoder_adapter is None or memory is None or not memory.holds(clips):
            return
        held = counted(len(clips.intersection(memory.clips)), "recording")
        adapter, config = model.decoder_adapter
        try:
            model.set_decoder_adapter(with_memory(adapter, memory.without(clips)), config)
        except ValueError as err:  # (nobody awaits this job: say it here)
            _LOGGER.error("the served memory could not forget the words of %s: %s", held, err)
            return
        _LOGGER.info("the served memory forgot the words of %s", held)

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread (blocking: call it off the event loop)."""
        self._executor.shutdown(wait=True)
