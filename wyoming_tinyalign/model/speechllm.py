"""SpeechLLM: frozen Whisper encoder -> trainable projector -> frozen LLM, with instruction injection.

Three ways from audio to (transcript, intent):

- `aligned`: the projected audio tokens are placed in the prompt's `{audio}` slot; the LLM answers with
  the transcript and the intent.
- `readout`: the transcript is read straight off the projector outputs (nearest LLM token embedding of
  each position, no LLM run); the LLM then only maps that text to an intent.
- `cascade`: Whisper's own decoder transcribes (leaning toward the household's names, `biasing.py`); the
  LLM maps the text to an intent. Works on day 0 (no projector needed) and is the nightly teacher.

For text, the token embeddings of the text go in the `{audio}` slot and the transcript line of the answer
is given, so the LLM only writes the intent line.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from ..intents import Intent, parse_answer, parse_intent
from .biasing import NameBias
from .bundle import BundleConfig, BundleError, ProjectorInfo, load_bundle_config, load_projector
from .decoder_adapter import Adapter, AdapterConfig, AdapterError, ShapedAdapter, install
from .decoder_memory import DecoderMemory
from .encoder import AudioEncoder
from .projector import Projector
from .prompt import PromptTemplate
from .slots import IntentGrammar, TokenTexts

PATHS = ("aligned", "readout", "cascade")


DECODING_VERSION = 11  # bump when a change to decoding changes what a model answers (stored answers expire)
LOOP_REPEATS = {1: 4, 2: 3, 3: 3}  # a unit of this many tokens, repeated this often, is a loop


def loop_start(ids: list[int]) -> int | None:
    """Where a greedy decoder's degenerate loop at the end of `ids` begins ("porch porch porch porch",
    "to 2 to 2 to 2"), or None. No answer of the intent format, nor a spoken command, repeats a unit
    that often."""
    for period, repeats in LOOP_REPEATS.items():
        unit = ids[-period:]
        if len(ids) < period * repeats or ids[-period * repeats :] != unit * repeats:
            continue
        start = len(ids) - period * repeats
        while start >= period and ids[start - period : start] == unit:
            start -= period
        return start
    return None


class _StopOnLoop(StoppingCriteria):
    """Ends generation once the answer has fallen into a loop (batch of one)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = [loop_start(row.tolist()) is not None for row in input_ids]
        return torch.tensor(done, device=input_ids.device)


@dataclass
class Result:
    """What the model made of one utterance."""

    transcript: str
    intent: Intent | None
    path: str
    # Mean log-probability of the transcript's tokens: Whisper's (cascade) or the LLM's (aligned).
    confidence: float | None = None
    latency_ms: float = 0.0


def resolve_ref(folder: Path, ref: str) -> str:
    """A backbone reference is a folder relative to the bundle, an absolute folder, or a hub id."""
    local = folder / ref
    return str(local) if local.is_dir() else ref


def whisper_prompt(
    whisper: WhisperForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, language: str | None = None
) -> tuple[list[int], list[int]]:
    """The decoder's start tokens (start, language, transcribe, no timestamps, as far as the checkpoint
    has them) and the special tokens a transcript never contains."""
    gen = whisper.generation_config
    ids = [gen.decoder_start_token_id]
    lang_ids = getattr(gen, "lang_to_id", None) or {}
    if getattr(gen, "is_multilingual", False) and f"<|{language or 'en'}|>" in lang_ids:
        ids.append(lang_ids[f"<|{language or 'en'}|>"])
    if getattr(gen, "task_to_id", None):
        ids.append(gen.task_to_id["transcribe"])
    if getattr(gen, "no_timestamps_token_id", None) is not None:
        ids.append(gen.no_timestamps_token_id)
    return ids, [i for i in tokenizer.all_special_ids if i != gen.eos_token_id]


@torch.no_grad()
def whisper_transcript(
    whisper: WhisperForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    feats: torch.Tensor,
    language: str | None = None,
    max_new_tokens: int | None = None,
    bias: NameBias | None = None,
    memory: DecoderMemory | None = None,
) -> tuple[str, float]:
    """Whisper's own greedy transcript of encoder features `[N, Da]`, with the household's `memory`
    mixed into its scores, and its mean token log-prob (before any `bias` toward the household's names;
    each token's by Whisper's own score or the mix's, whichever is higher: what the memory supports
    counts as evidence, and no token loses by being absent from it). A degenerate loop ends it, cut off
    where the loop began (as the LLM's answers are)."""
    ids, banned = whisper_prompt(whisper, tokenizer, language)
    eos = whisper.generation_config.eos_token_id
    encoder_outputs = (feats.unsqueeze(0).to(whisper.device),)
    written: list[int] = []
    logprobs, cache, new = [], None, list(ids)
    steps = whisper.config.max_target_positions - len(ids)
    for _ in range(min(steps, max_new_tokens or steps)):
        # Self- and cross-attention keys and values are cached: each step runs the decoder on one token.
        decoder_ids = torch.tensor([new], device=whisper.device)
        out = whisper(
            encoder_outputs=encoder_outputs, decoder_input_ids=decoder_ids, cache=cache, use_cache=True,
            output_hidden_states=memory is not None,
        )  # fmt: skip
        cache, logits = out.cache, out.logits[0, -1].float()
        logits[banned] = -float("inf")
        own = logp = torch.log_softmax(logits, -1)
        if memory is not None:
            logp = memory.mix(own, out.decoder_hidden_states[-1][0, -1])
        token = bias.pick(logp, written) if bias else int(logp.argmax())
        logprobs.append(max(float(own[token]), float(logp[token])))
        if token == eos:
            break
        written.append(token)
        new = [token]
        if (loop := loop_start(written)) is not None:
            del written[loop:]
            break
    text = tokenizer.decode(written, skip_special_tokens=True)
    return " ".join(text.strip().lower().split()), float(np.mean(logprobs)) if logprobs else 0.0


def load_whisper(ref: str, dtype: torch.dtype) -> WhisperForConditionalGeneration:
    """Whisper (`from_pretrained` on a folder or hub id) at `dtype`."""
    return WhisperForConditionalGeneration.from_pretrained(ref, dtype=dtype)


def load_llm(ref: str, dtype: torch.dtype) -> PreTrainedModel:
    """The LLM (`from_pretrained` on a folder or hub id) at `dtype`.

    A checkpoint stored narrower than `dtype` (Qwen2.5's bfloat16, run in float32 on a CPU) is read into
    memory and widened one tensor at a time: through the default memory map, the checkpoint's pages
    count beside the whole wider copy (Qwen2.5-0.5B's shapes: peak 3170 MiB that way, 2272 MiB this way,
    `benchmarks/RESULTS.md`)."""
    config = AutoConfig.from_pretrained(ref, trust_remote_code=False)
    stored = config.dtype
    if not isinstance(stored, torch.dtype) or stored.itemsize >= dtype.itemsize:
        return AutoModelForCausalLM.from_pretrained(ref, config=config, dtype=dtype, trust_remote_code=False)
    llm = AutoModelForCausalLM.from_pretrained(
        ref, config=config, dtype=stored, disable_mmap=True, trust_remote_code=False
    )
    for tensor in [*llm.parameters(), *llm.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    llm.config.dtype = dtype
    return llm


class SpeechLLM:
    """One loaded speech-LLM; share it, it is not changed by inference."""

    def __init__(
        self,
        *,
        whisper: WhisperForConditionalGeneration,
        whisper_tokenizer,
        feature_extractor: WhisperFeatureExtractor,
        llm,
        tokenizer,
        template: PromptTemplate,
        projector: Projector | None = None,
        projector_info: ProjectorInfo | None = None,
        cascade_pad_30s: bool = False,
        max_new_tokens: int = 48,
        whisper_ref: str | None = None,
    ) -> None:
        self.whisper = whisper.eval().requires_grad_(False)
        self.whisper_ref = whisper_ref  # where `whisper` was loaded from (for `separate_decoder`)
        self.whisper_tokenizer = whisper_tokenizer
        self.encoder = AudioEncoder(whisper.get_encoder(), feature_extractor)
        self.llm = llm.eval().requires_grad_(False)
        # The answer is greedy over the LLM's own scores: a checkpoint's sampling recipe (Qwen2.5-Instruct's
        # generation_config.json: repetition_penalty 1.1, top_k, top_p) would fill generate()'s unset
        # options, and a repetition penalty would push the intent line off the names the transcript said.
        self.llm.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        self.tokenizer = tokenizer
        self.template = template
        self.projector = projector.eval() if projector is not None else None
        self.projector_info = projector_info
        # Household adapters served in Whisper's decoder (`set_decoder_adapter`), with their shape, and
        # the memory of the household's corrections they may hold.
        self.decoder_adapter: ShapedAdapter | None = None
        self.decoder_memory: DecoderMemory | None = None
        self._separated = False
        self.cascade_pad_30s = cascade_pad_30s
        self.max_new_tokens = max_new_tokens
        # Token ids of the prompt around the audio slot, per household context (tokenized once), and the
        # LLM's KV cache of the prompt before the slot (computed once; each answer starts from a copy).
        self.prompt_ids = functools.lru_cache(maxsize=16)(self._prompt_ids)
        self.prefix_cache = functools.lru_cache(maxsize=4)(self._prefix_cache)
        # The cascade's bias toward each household context's names (tokenized once).
        self.name_bias = functools.lru_cache(maxsize=16)(
            functools.partial(NameBias.from_context, whisper_tokenizer)
        )
        # What `IntentGrammar` reads answers with (at load, not on a request).
        self.token_texts = TokenTexts.of(tokenizer)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SpeechLLM:
        """Load a bundle folder (see `bundle.py`); backbones come through `from_pretrained`."""
        folder = Path(folder)
        cfg: BundleConfig = load_bundle_config(folder)
        enc_ref, llm_ref = resolve_ref(folder, cfg.encoder), resolve_ref(folder, cfg.llm)
        try:
            whisper = load_whisper(enc_ref, dtype)
            whisper_tokenizer = AutoTokenizer.from_pretrained(enc_ref)
            feature_extractor = WhisperFeatureExtractor.from_pretrained(enc_ref)
            llm = load_llm(llm_ref, dtype)
            tokenizer = AutoTokenizer.from_pretrained(llm_ref, trust_remote_code=False)
            if cfg.lora:
                llm = PeftModel.from_pretrained(llm, str(folder / cfg.lora)).merge_and_unload()
        except OSError as err:
            raise BundleError(f"cannot load the backbones of {folder}: {err}") from err
        projector = info = None
        if cfg.projector:
            projector, info = load_projector(folder / cfg.projector, device)
            if (info.encoder, info.llm) != (cfg.encoder, cfg.llm):
                raise BundleError(
                    f"projector {cfg.projector} was aligned to {info.encoder} + {info.llm}, "
                    f"but the bundle uses {cfg.encoder} + {cfg.llm}"
                )
        return cls(
            whisper=whisper.to(device),
            whisper_tokenizer=whisper_tokenizer,
            feature_extractor=feature_extractor,
            llm=llm.to(device),
            tokenizer=tokenizer,
            template=PromptTemplate(cfg.prompt_template),
            projector=projector,
            projector_info=info,
            cascade_pad_30s=cfg.cascade_pad_30s,
            whisper_ref=enc_ref,
        )

    @contextmanager
    def separate_decoder(self) -> Iterator[None]:
        """Whisper's decoder (the cascade path) runs on a second load of Whisper inside the block.

        For a job that trains afterwards: the model's own Whisper then only ever reads its encoder, and
        the pages of the checkpoint that the decoder reads (about 200 MB at whisper-base, memory-mapped)
        go with the second load at the end of the block. (Without `whisper_ref` the block uses the
        model's own Whisper.) The second load serves the same decoder adapters; adapters set inside the
        block are the second load's, and the model serves what it served before after it (without
        `whisper_ref`, its Whisper keeps what the block installed). A block inside the block uses the
        same second load."""
        own, kept = self.whisper, (self.decoder_adapter, self.decoder_memory)
        if self._separated:
            yield
            return
        if self.whisper_ref is not None:
            try:
                second = load_whisper(self.whisper_ref, own.dtype)
            except OSError as err:
                raise BundleError(f"cannot load Whisper again from {self.whisper_ref}: {err}") from err
            self.whisper = second.to(own.device).eval().requires_grad_(False)
            if self.decoder_adapter is not None:
                install(self.whisper, *self.decoder_adapter)
        self._separated = True
        try:
            yield
        finally:
            self.whisper, self._separated = own, False
            self.decoder_adapter, self.decoder_memory = kept

    def set_decoder_adapter(self, adapter: Adapter | None, config: AdapterConfig | None = None) -> None:
        """Serve household adapters in Whisper's decoder (the cascade), with the memory they may hold
        (`decoder_memory.py`), or none (`None`)."""
        config = config or AdapterConfig()
        memory = DecoderMemory.of(adapter)  # (one that does not fit is refused before a weight changes)
        width = self.whisper.config.d_model
        if memory is not None and memory.keys.shape[1] != width:
            raise AdapterError(f"a memory of {memory.keys.shape[1]}-wide states; the decoder's are {width}")
        install(self.whisper, adapter, config)
        self.decoder_memory = memory
        self.decoder_adapter = None if adapter is None else (adapter, config)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def _projector_dtype(self) -> torch.dtype:
        assert self.projector is not None
        return next(self.projector.parameters()).dtype

    @property
    def has_aligned_projector(self) -> bool:
        return self.projector is not None and self.projector_info is not None and self.projector_info.trained

    # --------------------------------------------------------- building blocks
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """LLM input embeddings `[n, D]` of token ids."""
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, context: str) -> tuple[list[int], list[int]]:
        before, after = self.template.split(context)
        return self.text_ids(before), self.text_ids(after)

    @torch.no_grad()
    def _prefix_cache(self, context: str) -> DynamicCache | None:
        """The LLM's KV cache of the prompt text before the audio slot, or None when there is none.

        Call `prefix_cache.cache_clear()` after changing the LLM's weights (LoRA training)."""
        before_ids, _ = self.prompt_ids(context)
        if not before_ids:
            return None
        cache = DynamicCache(config=self.llm.config)
        self.llm(inputs_embeds=self.embed_tokens(before_ids).unsqueeze(0), cache=cache)
        return cache

    def prompt_embeds(self, content: torch.Tensor, context: str) -> tuple[torch.Tensor, slice]:
        """Place `content` `[M, D]` in the template's audio slot; returns `[1, L, D]` and the slot's span."""
        before_ids, after_ids = self.prompt_ids(context)
        pre, post = self.embed_tokens(before_ids), self.embed_tokens(after_ids)
        embeds = torch.cat([pre, content.to(pre.dtype), post]).unsqueeze(0)
        return embeds, slice(len(pre), len(pre) + len(content))

    @torch.no_grad()
    def project(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """Encoder + projector on a batch of clips; one `[M_i, D]` tensor per clip."""
        if self.projector is None:
            raise BundleError("this bundle has no projector: use the cascade path")
        feats, lengths = self.encoder.encode(audios)
        out, out_lengths = self.projector(feats.to(self._projector_dtype), lengths)
        return [o[: int(n)] for o, n in zip(out, out_lengths, strict=True)]

    @torch.no_grad()
    def project_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Projector on one clip's encoder features `[N, Da]` -> `[M, D]`."""
        if self.projector is None:
            raise BundleError("this bundle has no projector: use the cascade path")
        # Cached features (half precision, on the CPU) or a half-precision encoder's feed the projector.
        feats = feats.to(self.device, self._projector_dtype)
        out, out_lengths = self.projector(feats.unsqueeze(0), torch.tensor([len(feats)], device=feats.device))
        return out[0, : int(out_lengths[0])]

    @torch.no_grad()
    def generate(
        self,
        embeds: torch.Tensor,
        context: str | None = None,
        max_new_tokens: int | None = None,
        transcript: str | None = None,
    ) -> tuple[str, float | None]:
        """Greedy answer of the LLM to a prompt given as embeddings `[1, L, D]`, and how sure the LLM was
        of the transcript line the answer starts with (`_transcript_confidence`; None when the transcript
        is given). When the prompt is `context`'s (as `prompt_embeds` builds it), the LLM starts from its
        cached prefix and runs only on the rest, and the intent line keeps to the grammar of `intents.py`
        with the context's or the transcript's names (`IntentGrammar`; `transcript`: the transcript line
        when the prompt ends with it, so the answer is the intent line). A degenerate loop ends generation
        and is cut off where the loop began."""
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        prefix = grammar = None
        if context is not None:
            prefix = self.prefix_cache(context)
            grammar = IntentGrammar(self.token_texts, context, transcript)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            cache=copy.deepcopy(prefix),
            max_new_tokens=min(self.max_new_tokens, max_new_tokens or self.max_new_tokens),
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_StopOnLoop()]),
            logits_processor=LogitsProcessorList([grammar] if grammar else []),
            return_dict_in_generate=True,
            output_logits=transcript is None,
        )
        ids = out.sequences[0].tolist()
        ids = ids[: loop_start(ids)]
        confidence = self._transcript_confidence(ids, out.logits) if transcript is None else None
        return self.tokenizer.decode(ids, skip_special_tokens=True), confidence

    def _transcript_confidence(self, ids: list[int], logits: tuple[torch.Tensor, ...]) -> float | None:
        """Mean log-probability, by the LLM's own logits (before any logits processor), of an answer's
        tokens up to the first that holds a line break (included): its transcript line. None for an
        empty answer."""
        texts, logprobs = self.token_texts.texts, []
        for token, step in zip(ids, logits, strict=False):
            logprobs.append(float(torch.log_softmax(step[0].float(), -1)[token]))
            if token < len(texts) and "\n" in texts[token]:
                break
        return float(np.mean(logprobs)) if logprobs else None

    @torch.no_grad()
    def readout(self, embeds: torch.Tensor) -> str:
        """Nearest-token-embedding decoding of projector outputs `[M, D]` (no LLM run)."""
        table = self.llm.get_input_embeddings().weight
        ids = torch.cdist(embeds.to(table.dtype), table).argmin(-1).tolist()
        special = set(self.tokenizer.all_special_ids)
        return self.tokenizer.decode([i for i in ids if i not in special]).strip()

    @torch.no_grad()
    def understand_text(
        self, text: str, context: str = "", max_new_tokens: int | None = None
    ) -> Intent | None:
        """Text -> intent with the LLM; the transcript line of the answer is given."""
        text = " ".join(text.strip().lower().split())
        if not text:
            return None
        embeds, _ = self.prompt_embeds(self.embed_tokens(self.text_ids(text)), context)
        answer = self.embed_tokens(self.text_ids(text + "\n")).unsqueeze(0)
        line, _ = self.generate(torch.cat([embeds, answer], dim=1), context, max_new_tokens, transcript=text)
        return parse_intent(line.strip().split("\n")[0])

    @torch.no_grad()
    def transcribe_cascade(
        self,
        feats: torch.Tensor,
        language: str | None = None,
        max_new_tokens: int | None = None,
        context: str = "",
    ) -> tuple[str, float]:
        """`whisper_transcript` with this model's Whisper and its household memory, biased toward
        `context`'s names."""
        return whisper_transcript(
            self.whisper,
            self.whisper_tokenizer,
            feats,
            language,
            max_new_tokens,
            self.name_bias(context),
            self.decoder_memory,
        )

    @torch.no_grad()
    def encode(self, audio: np.ndarray, pad_30s: bool = False) -> torch.Tensor:
        """Encoder features `[N, Da]` of one clip (its true length, or padded to 30 s)."""
        mel, mel_lengths = self.encoder.features([audio])
        if pad_30s:
            mel = torch.nn.functional.pad(
                mel, (0, 2 * self.whisper.config.max_source_positions - mel.shape[-1])
            )
            mel_lengths = torch.tensor([mel.shape[-1]])
        feats, lengths = self.encoder(mel.to(self.device), mel_lengths)
        return feats[0, : int(lengths[0])]

    # ------------------------------------------------------------------ paths
    @torch.no_grad()
    def run(
        self,
        audio: np.ndarray,
        path: str = "aligned",
        context: str = "",
        language: str | None = None,
        with_intent: bool = True,
        max_new_tokens: int | None = None,
    ) -> Result:
        """Audio (float32, 16 kHz mono) -> transcript and intent along one path.

        `with_intent=False` skips the LLM on the readout and cascade paths (transcript only);
        `max_new_tokens` caps each decoder (validation: a longer answer than the reference cannot be right).
        """
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")
        t0 = time.perf_counter()
        if audio.size == 0 or float(np.abs(audio).max(initial=0.0)) < 1e-4:
            return Result("", None, path)
        feats = self.encode(audio, pad_30s=path == "cascade" and self.cascade_pad_30s)
        result = self.run_features(feats, path, context, language, with_intent, max_new_tokens)
        result.latency_ms = (time.perf_counter() - t0) * 1000
        return result

    @torch.no_grad()
    def run_features(
        self,
        feats: torch.Tensor,
        path: str,
        context: str = "",
        language: str | None = None,
        with_intent: bool = True,
        max_new_tokens: int | None = None,
    ) -> Result:
        """`run` from encoder features `[N, Da]` (training validates on cached features)."""
        t0 = time.perf_counter()
        confidence = None
        if path == "cascade":
            transcript, confidence = self.transcribe_cascade(feats, language, max_new_tokens, context)
            intent = self.understand_text(transcript, context, max_new_tokens) if with_intent else None
        else:
            content = self.project_features(feats)
            if path == "readout":
                transcript = self.readout(content)
                intent = self.understand_text(transcript, context, max_new_tokens) if with_intent else None
            else:
                embeds, _ = self.prompt_embeds(content, context)
                answer, confidence = self.generate(embeds, context, max_new_tokens)
                transcript, intent = parse_answer(answer)
        return Result(transcript, intent, path, confidence, (time.perf_counter() - t0) * 1000)
