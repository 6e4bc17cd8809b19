"""The Wyoming protocol, one handler per connection: it only speaks the protocol; `Assistant` does the work.

- `describe` and `ping` are answered at once, even while this connection's own request is running: model
  work runs as a background job and later events of the connection wait for it, so answers keep order.
- Events are read with limits (`read_event`): a header line of at most 64 KiB, data plus payload of at most
  `max_event_bytes`, a read timeout inside an event and inside an audio stream, an idle timeout between
  requests. Bad input gets an `error` event (code and text) and the connection is closed cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event, Eventable, async_write_event
from wyoming.handle import Handled, NotHandled
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Describe,
    HandleModel,
    HandleProgram,
    Info,
    IntentModel,
    IntentProgram,
    SelectProgram,
)
from wyoming.intent import Entity, NotRecognized, Recognize
from wyoming.intent import Intent as WyomingIntent
from wyoming.ping import Ping, Pong
from wyoming.pipeline import PipelineStage, RunPipeline
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize

from . import __version__
from .assistant import Answer, Assistant, Request, response_text
from .intents import Intent
from .worker import PcmSegment

_LOGGER = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 2.0
STOP_GRACE_S = 1.0  # once the server stops, how long an idle connection waits for an event on its way
ASR_PROGRAM, INTENT_PROGRAM, HANDLE_PROGRAM = "tinyalign", "tinyalign-intent", "tinyalign-handle"
ATTRIBUTION = Attribution(
    name="wyoming-tinyalign (Tiny-Align speech-LLM)", url="https://arxiv.org/abs/2411.13766"
)
NOT_UNDERSTOOD = "Sorry, I did not understand that."
NOT_SURE = "Sorry, I am not sure I heard that right."  # an intent withheld (serve --min-confidence)
MAX_RATE, MAX_CHANNELS = 192_000, 8
STREAM_BYTES_PER_SECOND = 48_000 * 4 * 2  # raw bytes allowed per second of --max-audio-seconds
E = TypeVar("E", bound=Eventable)


class ProtocolError(Exception):
    """A client broke the protocol or a limit; sent back as an `error` event before closing."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code, self.text = code, text


@dataclass(frozen=True)
class ServerSettings:
    """Protocol limits and options shared by all connections."""

    language: str = "en"
    max_audio_seconds: float = 30.0
    max_event_bytes: int = 4 * 1024 * 1024
    read_timeout: float = 30.0
    idle_timeout: float | None = 600.0
    streaming: bool = True
    tts_uri: str | None = None


def build_info(model_name: str, description: str, version: str | None, settings: ServerSettings) -> Info:
    """`info`: an asr program, an intent program (Home Assistant executes the intents) and a handle one."""
    common: dict[str, Any] = {"attribution": ATTRIBUTION, "installed": True, "version": __version__}
    model: dict[str, Any] = {
        **common,
        "name": model_name,
        "description": description,
        "version": version or __version__,
        "languages": [settings.language],
    }
    return Info(
        asr=[
            AsrProgram(
                name=ASR_PROGRAM,
                description="Speech-to-text with a Tiny-Align speech-LLM",
                models=[AsrModel(**model)],
                supports_transcript_streaming=settings.streaming,
                **common,
            )
        ],
        intent=[
            IntentProgram(
                name=INTENT_PROGRAM,
                description="Home Assistant intents from text (and from the audio it just heard)",
                models=[IntentModel(**model)],
                **common,
            )
        ],
        handle=[
            HandleProgram(
                name=HANDLE_PROGRAM,
                description="Recognizes the intent and answers with a confirmation sentence",
                models=[HandleModel(**model)],
                **common,
            )
        ],
    )


def wyoming_intent(intent: Intent) -> WyomingIntent:
    """Our intent as Home Assistant reads it: slots as entities (whole numbers as ints), a spoken text."""
    entities = [Entity(name=k, value=int(v) if v.isdigit() else v) for k, v in intent.slots.items()]
    return WyomingIntent(name=intent.name, entities=entities, text=response_text(intent))


async def read_event(
    reader: asyncio.StreamReader, max_bytes: int, wait: float | None, read_timeout: float
) -> Event | None:
    """Read one event within limits; None at the end of the stream.

    `wait` bounds the wait for the header line; `read_timeout` bounds the rest of the event.
    """
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), wait)
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as err:
        raise ProtocolError("event-too-large", f"event header longer than {MAX_HEADER_BYTES} bytes") from err
    except TimeoutError as err:
        raise ProtocolError("timeout", f"no event for {wait:g} s") from err
    try:
        header = json.loads(line)
    except ValueError as err:
        raise ProtocolError("bad-event", "event header is not JSON") from err
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("bad-event", "event header has no type")
    data = header.get("data") or {}
    lengths = [header.get("data_length") or 0, header.get("payload_length") or 0]
    if not isinstance(data, dict) or any(type(n) is not int or n < 0 for n in lengths):
        raise ProtocolError("bad-event", "event header has bad data, data_length or payload_length")
    if sum(lengths) > max_bytes:
        raise ProtocolError("event-too-large", f"event of {sum(lengths)} bytes; the limit is {max_bytes}")
    try:
        if lengths[0]:
            extra = json.loads(await asyncio.wait_for(reader.readexactly(lengths[0]), read_timeout))
            if not isinstance(extra, dict):
                raise ProtocolError("bad-event", "event data is not a JSON object")
            data.update(extra)
        payload = await asyncio.wait_for(reader.readexactly(lengths[1]), read_timeout) if lengths[1] else None
    except asyncio.IncompleteReadError:
        return None
    except TimeoutError as err:
        raise ProtocolError("timeout", f"event body not received within {read_timeout:g} s") from err
    except ValueError as err:
        raise ProtocolError("bad-event", "event data is not JSON") from err
    return Event(type=header["type"], data=data, payload=payload)


async def close_gently(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, briefly discard what the client still sends, then close.

    Closing a socket with unread input makes the kernel send a reset, and the client may lose the last
    events (an `error` above all); this way it reads them and then the end of the stream.
    """
    try:
        with suppress(OSError, RuntimeError, TimeoutError):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await reader.read(1 << 16):
                    pass
    finally:
        writer.close()
        with suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), LINGER_S)


def parse(kind: type[E], event: Event) -> E:
    """`kind.from_event`, with malformed data reported as a protocol error."""
    try:
        return kind.from_event(event)  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ProtocolError("bad-event", f"malformed {event.type} event ({err!r})") from err


class AudioStream:
    """The raw PCM of one utterance as it arrived, checked for format and length."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.seconds = 0.0
        self._bytes = 0
        self._parts: list[tuple[tuple[int, int, int], bytearray]] = []

    @staticmethod
    def check_format(rate: Any, width: Any, channels: Any) -> None:
        fields = (rate, width, channels)
        if any(type(v) is not int for v in fields) or not (
            1000 <= rate <= MAX_RATE and 1 <= width <= 4 and 1 <= channels <= MAX_CHANNELS
        ):
            raise ProtocolError(
                "bad-audio-format",
                f"unsupported audio format rate={rate} width={width} channels={channels} "
                f"(rate 1000-{MAX_RATE}, width 1-4, channels 1-{MAX_CHANNELS})",
            )

    def add(self, rate: int, width: int, channels: int, pcm: bytes) -> None:
        self.check_format(rate, width, channels)
        frame = width * channels
        if len(pcm) % frame:
            raise ProtocolError(
                "bad-audio", f"audio chunk of {len(pcm)} bytes is not whole {frame}-byte frames"
            )
        self.seconds += len(pcm) / (frame * rate)
        self._bytes += len(pcm)
        if self.seconds > self.max_seconds + 1e-6 or self._bytes > self.max_seconds * STREAM_BYTES_PER_SECOND:
            raise ProtocolError(
                "audio-too-long", f"more than {self.max_seconds:g} s of audio (--max-audio-seconds)"
            )
        fmt = (rate, width, channels)
        if self._parts and self._parts[-1][0] == fmt:
            self._parts[-1][1].extend(pcm)
        elif pcm:
            self._parts.append((fmt, bytearray(pcm)))

    def segments(self) -> list[PcmSegment]:
        return [PcmSegment(*fmt, bytes(pcm)) for fmt, pcm in self._parts]


class TinyAlignHandler(AsyncEventHandler):
    """One Wyoming connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        assistant: Assistant,
        settings: ServerSettings,
        info: Event,
        client: str,
    ) -> None:
        super().__init__(reader, writer)
        self.assistant = assistant
        self.settings = settings
        self.client = client
        self._info = info
        self._language = settings.language
        self._context: dict[str, Any] = {}
        self._pipeline: RunPipeline | None = None
        self._handle_mode = False
        self._stream: AudioStream | None = None
        self._job: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._closed = False

    # ---------------------------------------------------------------- connection
    async def run(self) -> None:
        """Read events until the client leaves, breaks the protocol, or the server stops."""
        try:
            while not self._closed:
                try:
                    event = await self._next_event()
                    if event is None:
                        if self._stream is not None:
                            _LOGGER.info("%s: connection ended in the middle of an audio stream", self.client)
                        break
                    if not await self.handle_event(event):
                        break
                except ProtocolError as err:
                    _LOGGER.warning("%s: %s", self.client, err)
                    await self._finish_job()
                    await self.write_event(Error(text=err.text, code=err.code).event())
                    break
            await self._finish_job()
        finally:
            if self._job is not None:
                self._job.cancel()
            await self._close()

    @property
    def busy(self) -> bool:
        """An audio stream is open or a request is running."""
        return self._stream is not None or (self._job is not None and not self._job.done())

    def request_stop(self) -> None:
        """Graceful stop: finish the request in flight and what the client has already sent, then close."""
        self._stopping.set()

    async def _next_event(self) -> Event | None:
        """The next event, or None at the end of the stream. Once the server is stopping, a connection
        between audio streams waits only `STOP_GRACE_S` for an event already on its way (a request its
        client has sent is still answered), so the stop never cuts a stream or an event in two."""
        max_bytes, read_timeout = self.settings.max_event_bytes, self.settings.read_timeout
        if self._stream is not None:  # mid-stream (the audio path): the stop waits for the stream's end
            return await read_event(self.reader, max_bytes, read_timeout, read_timeout)
        wait = self.settings.idle_timeout
        read = asyncio.ensure_future(read_event(self.reader, max_bytes, wait, read_timeout))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
            # Stopping: an event on its way still counts (read_event's own timeouts raise ProtocolError).
            return read.result() if read.done() else await asyncio.wait_for(read, STOP_GRACE_S)
        except TimeoutError:
            return None
        finally:
            stopping.cancel()
            read.cancel()

    async def write_event(self, event: Event) -> None:
        """Send an event; a client that has gone or stopped reading ends the connection."""
        if self._closed:
            return
        try:
            await asyncio.wait_for(async_write_event(event, self.writer), self.settings.read_timeout)
        except (ConnectionError, TimeoutError) as err:
            _LOGGER.info(
                "%s: cannot send %s (%s); closing", self.client, event.type, err or type(err).__name__
            )
            self._closed = True
            self.reader.feed_eof()

    async def _close(self) -> None:
        self._closed = True
        await close_gently(self.reader, self.writer)

    async def _finish_job(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            await job

    def _start_job(self, coro: Coroutine[Any, Any, None]) -> None:
        self._job = asyncio.create_task(coro)

    # ---------------------------------------------------------------- events
    async def handle_event(self, event: Event) -> bool:
        """Dispatch one event; False ends the connection."""
        if Describe.is_type(event.type):
            await self.write_event(self._info)
            return not self._closed
        if Ping.is_type(event.type):
            await self.write_event(Pong(text=parse(Ping, event).text).event())
            return not self._closed
        await self._finish_job()  # everything else waits for this connection's previous request

        if Transcribe.is_type(event.type):
            transcribe = parse(Transcribe, event)
            self._pipeline = None
            self._language = transcribe.language or self.settings.language
            if not isinstance(self._language, str):
                raise ProtocolError("bad-event", "transcribe: language must be a string")
            self._context = _as_dict(transcribe.context)
        elif RunPipeline.is_type(event.type):
            pipeline = parse(RunPipeline, event)
            if pipeline.start_stage != PipelineStage.ASR:
                raise ProtocolError("unsupported-stage", "this server runs pipelines that start with asr")
            self._pipeline, self._language, self._context = pipeline, self.settings.language, {}
        elif AudioStart.is_type(event.type):
            start = parse(AudioStart, event)
            AudioStream.check_format(start.rate, start.width, start.channels)
            self._stream = AudioStream(self.settings.max_audio_seconds)
        elif AudioChunk.is_type(event.type):
            if self._stream is None:
                raise ProtocolError("no-audio-start", "audio-chunk before audio-start")
            chunk = parse(AudioChunk, event)
            self._stream.add(chunk.rate, chunk.width, chunk.channels, chunk.audio or b"")
        elif AudioStop.is_type(event.type):
            if self._stream is None:
                raise ProtocolError("no-audio-start", "audio-stop before audio-start")
            segments, self._stream = self._stream.segments(), None
            request = Request(self.client, self._language, self._context)
            self._start_job(self._answer_audio(segments, request, self._pipeline))
            self._pipeline = None
        elif Transcript.is_type(event.type) or Recognize.is_type(event.type):
            is_transcript = Transcript.is_type(event.type)
            text_event = parse(Transcript, event) if is_transcript else parse(Recognize, event)
            language = getattr(text_event, "language", None) or self._language
            if not isinstance(text_event.text, str) or not isinstance(language, str):
                raise ProtocolError("bad-event", f"{event.type}: text and language must be strings")
            request = Request(self.client, language, _as_dict(text_event.context))
            handle = is_transcript and self._handle_mode
            self._start_job(self._answer_text(text_event.text, request, handle))
        elif SelectProgram.is_type(event.type):
            self._handle_mode = parse(SelectProgram, event).name == HANDLE_PROGRAM
        else:
            _LOGGER.debug("%s: ignoring a %s event", self.client, event.type)
        return not self._closed

    async def _answer_audio(
        self, segments: list[PcmSegment], request: Request, pipeline: RunPipeline | None
    ) -> None:
        try:
            answer = await self.assistant.transcribe(segments, request)
        except Exception:
            _LOGGER.exception("%s: inference failed", self.client)
            await self.write_event(Error(text="inference failed", code="inference-failed").event())
            return
        await self._send_transcript(answer.transcript, request.language)
        if pipeline is None or pipeline.end_stage == PipelineStage.ASR:
            return
        if pipeline.end_stage == PipelineStage.INTENT:
            await self._send_intent(answer)
            return
        spoken = await self._send_handled(answer)
        if pipeline.end_stage == PipelineStage.TTS:
            await self._speak(spoken)

    async def _answer_text(self, text: str, request: Request, handle: bool) -> None:
        try:
            answer = await self.assistant.understand(text, request)
        except Exception:
            _LOGGER.exception("%s: intent recognition failed", self.client)
            await self.write_event(Error(text="intent recognition failed", code="inference-failed").event())
            return
        await (self._send_handled(answer) if handle else self._send_intent(answer))

    async def _send_transcript(self, text: str, language: str) -> None:
        if self.settings.streaming:
            await self.write_event(TranscriptStart(language=language).event())
            if text:
                await self.write_event(TranscriptChunk(text=text).event())
            await self.write_event(TranscriptStop().event())
        await self.write_event(Transcript(text=text, language=language).event())

    async def _send_intent(self, answer: Answer) -> None:
        if answer.intent is None:
            await self.write_event(NotRecognized(text=_sorry(answer)).event())
        else:
            await self.write_event(wyoming_intent(answer.intent).event())

    async def _send_handled(self, answer: Answer) -> str:
        """`handled` with a confirmation sentence (Home Assistant's API executes nothing yet)."""
        if answer.intent is None:
            text = _sorry(answer)
            await self.write_event(NotHandled(text=text).event())
        else:
            text = response_text(answer.intent)
            await self.write_event(Handled(text=text).event())
        return text

    async def _speak(self, text: str) -> None:
        """Forward `text` to the Wyoming TTS server and stream its audio back to the client."""
        if not self.settings.tts_uri:
            await self.write_event(
                Error(
                    text="no text-to-speech server is configured (--tts-uri)", code="tts-unavailable"
                ).event()
            )
            return
        timeout = self.settings.read_timeout
        try:
            async with AsyncClient.from_uri(self.settings.tts_uri, timeout, timeout) as tts:
                await tts.write_event(Synthesize(text=text).event())
                while True:
                    event = await tts.read_event()
                    if event is None:
                        raise ConnectionError("the text-to-speech server closed the connection")
                    if Error.is_type(event.type) or any(
                        kind.is_type(event.type) for kind in (AudioStart, AudioChunk, AudioStop)
                    ):
                        await self.write_event(event)
                    if AudioStop.is_type(event.type) or Error.is_type(event.type) or self._closed:
                        return
        except (OSError, TimeoutError) as err:
            _LOGGER.warning("%s: text-to-speech at %s failed: %s", self.client, self.settings.tts_uri, err)
            await self.write_event(Error(text=f"text-to-speech failed: {err}", code="tts-failed").event())


def _sorry(answer: Answer) -> str:
    """What to say when there is no intent to act on: unsure of what was heard, or not understood."""
    return NOT_SURE if answer.withheld is not None else NOT_UNDERSTOOD


def _as_dict(value: Any) -> dict[str, Any]:
    """A client's `context`, when it is a JSON object (anything else is ignored)."""
    return value if isinstance(value, dict) else {}
