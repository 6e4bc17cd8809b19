"""Offline development models: everything a speech-LLM needs, built here with no model hub.

`build_dev_model` makes a bundle folder with
- a byte-level BPE tokenizer trained on generated home-automation text,
- a tiny Qwen2 LLM pretrained to answer the prompt template with "transcript, newline, intent" for text
  placed in the audio slot (clean, padded to the cast length, or corrupted, with and without household
  context, so it learns to lean on the context),
- a tiny Whisper trained as an ASR on espeak-ng speech of the base households and of a crowd of other
  voices (a frozen *random* encoder carries too little for a projector to learn from; real Whisper is
  pretrained on many voices and accents, so the stand-in is too),
- a BridgeFormer projector aligned on that speech with the combined objective (generative + a light
  EmbedLink term, `train.train`) for a fixed number of epochs (not minutes: a slower machine builds the
  same model, only later).
Everything is saved with `save_pretrained` and loaded back through the same `from_pretrained` code as
real models.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from . import __version__
from .checkpoint import Checkpoint
from .corpus import Command, generate_commands, random_household
from .evaluate import evaluate_items, evaluate_text
from .files import write_atomic
from .households import Household, Speaker, context_text, load_households
from .intents import format_answer
from .manifest import load_utterances
from .model.bundle import BundleConfig, load_bundle_config, save_bundle_config
from .model.encoder import AudioEncoder
from .model.prompt import DEFAULT_TEMPLATE, PromptTemplate, answer_ids
from .model.speechllm import PATHS, SpeechLLM
from .synth import render_once
from .train import STATE_FILE, Progress, TrainConfig, lr_factor, train

_LOGGER = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
WHISPER_SPECIALS = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>"]
CTC_CHARS = " abcdefghijklmnopqrstuvwxyz'"
_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
CTC_WEIGHT = 0.3
# The EmbedLink term's weight in the projector's combined objective. At 1 it dominates the loss late in
# training and holds the aligned path back (held-out intent accuracy 0.847 against 0.916 at 0.1, same
# 6 epochs, RESULTS.md); 0.1 keeps the outputs in the embeddings' space but gives up most of the
# readout path (WER 0.35 -> 0.78).
ALIGN_EMBEDLINK_WEIGHT = 0.1
CHECKPOINT_EVERY_S = 300.0  # a build stopped inside its LLM's or Whisper's training loses at most this much
# The crowd: voices that only the tiny Whisper hears, as real Whisper has heard many accents before a
# household ever speaks to it. English accents and other languages' voices reading English; none is a
# voice or a language of the `unseen` households, which stay unheard by every part of the dev model.
CROWD_LANGUAGES = (
    "en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-us-nyc",
    "es", "it", "pt", "pl", "sv", "da", "cs", "hu", "ro", "fi", "tr",
)  # fmt: skip
CROWD_VARIANTS = ("", "+m1", "+m2", "+m4", "+m5", "+m6", "+m7", "+f1", "+f3", "+f4", "+f5", "+klatt")
CHITCHAT = [
    "what a lovely day",
    "tell me a joke",
    "how are you today",
    "thank you very much",
    "who won the game last night",
    "i am going to bed now",
    "what is the meaning of life",
    "never mind",
    "sing me a song",
    "good job",
]


@dataclass(frozen=True)
class DevSize:
    """How big and how long-trained each part of a dev model is."""

    vocab: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_steps: int
    whisper_dim: int
    whisper_enc_layers: int
    whisper_dec_layers: int
    whisper_heads: int
    whisper_steps: int
    speech_utterances: int
    crowd_utterances: int  # of crowd voices, for the tiny Whisper only
    val_utterances: int
    eval_utterances: int
    projector_hidden: int
    heldout_commands: int
    align_epochs: int  # the projector's budget: epochs, not minutes, so a slow machine builds the same model
    cast_len: int = 24
    batch: int = 32


SIZES = {
    "micro": DevSize(
        vocab=400, llm_hidden=64, llm_layers=2, llm_heads=2, llm_steps=200,
        whisper_dim=64, whisper_enc_layers=1, whisper_dec_layers=1, whisper_heads=2, whisper_steps=60,
        speech_utterances=48, crowd_utterances=20, val_utterances=8, eval_utterances=12,
        projector_hidden=64, heldout_commands=24,
        align_epochs=2, batch=16,
    ),
    "small": DevSize(
        vocab=700, llm_hidden=256, llm_layers=3, llm_heads=4, llm_steps=1200,
        whisper_dim=192, whisper_enc_layers=3, whisper_dec_layers=2, whisper_heads=4, whisper_steps=6400,
        speech_utterances=9600, crowd_utterances=2400, val_utterances=100, eval_utterances=150,
        projector_hidden=256, heldout_commands=240, align_epochs=6, batch=16,
    ),
}  # fmt: skip


# ------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the domain's text, with the LLM's and Whisper's special tokens."""
    tok = Tokenizer(models.BPE())
    # Digits one by one (as Qwen2 does): a tiny LLM learns to copy 10 digit tokens, not 100 numbers.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, *WHISPER_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=WHISPER_SPECIALS,
    )


# ------------------------------------------------------------------------ LLM
@dataclass
class TextExample:
    context: str
    content: str  # what is in the audio slot (may be corrupted)
    answer: Command | None  # None for chit-chat
    transcript: str


def crowd_households(n: int, rng: random.Random) -> list[Household]:
    """`n` households with random names, each of three random crowd voices at random pitch and speed."""
    households = []
    for i in range(n):
        house = random_household(rng)
        speakers = [
            Speaker(
                id=f"crowd{i}-{j}",
                voice=rng.choice(CROWD_LANGUAGES) + rng.choice(CROWD_VARIANTS),
                speed=rng.randint(135, 190),
                pitch=rng.randint(25, 80),
                noise_snr_db=rng.choice([None, None, 15.0, 25.0]),
            )
            for j in range(3)
        ]
        households.append(replace(house, name=f"crowd{i}", split="crowd", speakers=speakers))
    return households


def text_examples(households: list[Household], n: int, rng: random.Random) -> list[TextExample]:
    """Commands of the given and of random households, plus chit-chat, each with its context."""
    examples = []
    for i in range(n):
        house = households[i % len(households)] if rng.random() < 0.5 else random_household(rng)
        context = context_text(house) if rng.random() < 0.8 else ""
        if rng.random() < 0.06:
            text = rng.choice(CHITCHAT)
            examples.append(TextExample(context, text, None, text))
        else:
            (cmd,) = generate_commands(house, 1, rng)
            examples.append(TextExample(context, cmd.text, cmd, cmd.text))
    return examples


def _corrupt(ids: list[int], vocab: list[int], rng: random.Random, rate: float = 0.15) -> list[int]:
    """Replace, drop or repeat a share of tokens: what a half-aligned projector looks like."""
    out = []
    for i in ids:
        r = rng.random()
        if r < rate / 3:
            out.append(rng.choice(vocab))
        elif r < 2 * rate / 3:
            continue
        elif r < rate:
            out += [i, i]
        else:
            out.append(i)
    return out or ids


def encode_llm_examples(
    tokenizer: PreTrainedTokenizerFast,
    template: PromptTemplate,
    examples: list[TextExample],
    cast_len: int,
    rng: random.Random,
) -> list[tuple[list[int], int]]:
    """Token ids of prompt + answer, and where the answer starts (the loss covers only the answer)."""
    special = set(tokenizer.all_special_ids)
    regular = [i for i in range(len(tokenizer)) if i not in special]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for ex in examples:
        before, after = template.split(ex.context)
        content = ids(ex.content)[:cast_len]
        if rng.random() < 0.3:
            content = _corrupt(content, regular, rng)[:cast_len]
        if rng.random() < 0.5:  # as the projector delivers it: padded to the cast length
            content = content + [tokenizer.pad_token_id] * (cast_len - len(content))
        prompt = ids(before) + content + ids(after)
        target = answer_ids(tokenizer, ex.transcript, ex.answer.intent if ex.answer else None)
        out.append((prompt + target, len(prompt)))
    return out


def _batches(items: list, batch: int, rng: random.Random):
    """Endless shuffled batches."""
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            yield [items[j] for j in order[i : i + batch]]


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    return peak * lr_factor(step, warmup, (step - warmup) / max(1, total - warmup))


def _resume(saves: Checkpoint) -> int:
    """Restore a training loop's last save, if it has a usable one; returns its step (0: none)."""
    saved = saves.read()
    if saved is None:
        return 0
    saves.restore(saved)
    _LOGGER.info(
        "%s: going on from step %d (saved by a run stopped part-way)", saves.path.stem, saved.state["step"]
    )
    return saved.state["step"]


def train_llm(
    tokenizer: PreTrainedTokenizerFast,
    encoded: list[tuple[list[int], int]],
    size: DevSize,
    seed: int,
    checkpoint: Path | None = None,
) -> Qwen2ForCausalLM:
    """Pretrain a tiny Qwen2 on prompt -> answer (loss on the answer only). With `checkpoint`, its state
    is saved there every `CHECKPOINT_EVERY_S` and a run stopped part-way goes on from it."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.llm_hidden,
        intermediate_size=3 * size.llm_hidden,
        num_hidden_layers=size.llm_layers,
        num_attention_heads=size.llm_heads,
        num_key_value_heads=max(1, size.llm_heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    llm = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(llm.parameters(), lr=3e-3, weight_decay=0.01)
    saves = Checkpoint(checkpoint, {"llm": llm, "opt": opt}, every_s=CHECKPOINT_EVERY_S)
    done = _resume(saves)
    batches = _batches(encoded, size.batch, random.Random(seed))
    for _ in range(done):  # the batches the saved steps took: the data order goes on where it was
        next(batches)
    progress = Progress("llm", size.llm_steps, before=done)
    llm.train()
    for step, batch in zip(range(done + 1, size.llm_steps + 1), batches, strict=False):
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, start) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, start : len(ids)] = torch.tensor(ids[start:])
            mask[i, : len(ids)] = 1
        for group in opt.param_groups:
            group["lr"] = _lr(step, size.llm_steps, 3e-3)
        loss = llm(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        progress.update(step, loss.item())
        saves.save({"step": step})
    return llm.eval()


# -------------------------------------------------------------------- Whisper
@contextmanager
def _deterministic() -> Iterator[None]:
    """Torch's deterministic kernels inside. The Whisper decoder's learned positions are gathered by
    index; on more than one thread the gradient of a large enough batch's gather was summed in no fixed
    order, so two builds on one machine trained two Whisper models, apart from the first steps. At small
    size 40 steps on 400 utterances, their features included, took 9.0-9.2 s with it, 8.3-8.6 s without."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def whisper_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """The fields real Whisper checkpoints carry, so the cascade code treats both alike."""
    tid = tokenizer.convert_tokens_to_ids
    return GenerationConfig(
        decoder_start_token_id=tid("<|startoftranscript|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        is_multilingual=True,
        lang_to_id={"<|en|>": tid("<|en|>")},
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        no_timestamps_token_id=tid("<|notimestamps|>"),
        max_length=48,
    )


def number_words(n: int) -> str:
    """A number below a million in words: 28 -> "twenty eight", 105 -> "one hundred five"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    unit, name = (1000, "thousand") if n >= 1000 else (100, "hundred")
    head, rest = divmod(n, unit)
    return f"{number_words(head)} {name}" + ("" if rest == 0 else " " + number_words(rest))


def spoken(text: str) -> str:
    """The text as it sounds, numbers spelled out: the CTC target, which must follow the sound in time."""
    return re.sub(r"\d+", lambda m: number_words(int(m.group())), text.lower())


def _spec_augment(mel: torch.Tensor, length: int, rng: random.Random) -> torch.Tensor:
    mel = mel.clone()
    f = rng.randrange(0, 8)
    f0 = rng.randrange(0, mel.shape[0] - f)
    mel[f0 : f0 + f, :length] = mel[:, :length].mean()
    for _ in range(2):
        t = rng.randrange(0, max(1, min(8, length // 10)))  # short: never a whole word like "on"
        t0 = rng.randrange(0, max(1, length - t))
        mel[:, t0 : t0 + t] = mel[:, :length].mean()
    return mel


def decoder_loss(
    whisper: WhisperForConditionalGeneration,
    feats: torch.Tensor,
    sequences: list[list[int]],
    n_prompt: int | list[int],
    pad_id: int,
) -> torch.Tensor:
    """Cross-entropy of Whisper's decoder writing each sequence after its `n_prompt` start tokens (one
    number for all, or one per sequence), then the end token, from encoder features `feats` `[B, N, D]`
    (zero past each clip: the cross-attention has no padding mask)."""
    logits, labels = decoder_logits(whisper, feats, sequences, n_prompt, pad_id)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def decoder_logits(
    whisper: WhisperForConditionalGeneration,
    feats: torch.Tensor,
    sequences: list[list[int]],
    n_prompt: int | list[int],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `decoder_loss` scores: the decoder's logits `[B, T, V]` and the token each position should
    write (`-100` where none: the start tokens but the last, and the padding)."""
    starts = n_prompt if isinstance(n_prompt, list) else [n_prompt] * len(sequences)
    eos = whisper.generation_config.eos_token_id
    width = max(len(ids) for ids in sequences) + 1
    dec = torch.full((len(sequences), width), pad_id, device=feats.device)
    labels = torch.full((len(sequences), width), -100, device=feats.device)
    for i, (ids, start) in enumerate(zip(sequences, starts, strict=True)):
        target = [*ids, eos]
        dec[i, : len(ids)] = torch.tensor(ids)
        labels[i, start - 1 : len(target) - 1] = torch.tensor(target[start:])
    hidden = whisper.model.decoder(
        input_ids=dec, attention_mask=(dec != pad_id).long(), encoder_hidden_states=feats
    ).last_hidden_state
    return whisper.proj_out(hidden), labels


@_deterministic()  # the same speech and seed train the same Whisper
def train_whisper(
    tokenizer: PreTrainedTokenizerFast,
    feature_extractor: WhisperFeatureExtractor,
    speech: list[tuple[np.ndarray, str]],
    size: DevSize,
    seed: int,
    checkpoint: Path | None = None,
) -> WhisperForConditionalGeneration:
    """Train a tiny Whisper as an ASR, on the true length of each clip (as it is run). With `checkpoint`,
    its state is saved there every `CHECKPOINT_EVERY_S` and a run stopped part-way goes on from it.

    Besides the decoder's cross-entropy, a character CTC head on the encoder (dropped after training)
    carries `CTC_WEIGHT` of the loss: it makes the encoder's frames carry the sounds early, before the
    decoder has learned to look at them (measured at small size, 1500 steps: WER 0.148 without, 0.074
    with, on held-out speech of the trained voices). Its targets are the text as spoken (`spoken`):
    CTC reads in time order, and "18" is said "eighteen", its "8" before its "1".
    """
    torch.manual_seed(seed)
    gen = whisper_generation_config(tokenizer)
    cfg = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=feature_extractor.feature_size,
        d_model=size.whisper_dim,
        encoder_layers=size.whisper_enc_layers,
        decoder_layers=size.whisper_dec_layers,
        encoder_attention_heads=size.whisper_heads,
        decoder_attention_heads=size.whisper_heads,
        encoder_ffn_dim=4 * size.whisper_dim,
        decoder_ffn_dim=4 * size.whisper_dim,
        max_target_positions=gen.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=gen.decoder_start_token_id,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    whisper = WhisperForConditionalGeneration(cfg)
    whisper.generation_config = gen
    # HF's init (std 0.02) leaves the convolutions' output ~1% of the sinusoidal positions: the decoder
    # then learns a language model and ignores the sound. Give the sound a fair share from the start.
    enc = whisper.get_encoder()
    with torch.no_grad():
        for conv in (enc.conv1, enc.conv2):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        enc.embed_positions.weight.mul_(0.1)
    encoder = AudioEncoder(whisper.get_encoder(), feature_extractor)
    ctc_head = torch.nn.Linear(size.whisper_dim, len(CTC_CHARS) + 1)  # + the blank, index 0
    prefix = [gen.decoder_start_token_id, gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"]]
    prefix.append(gen.no_timestamps_token_id)
    items = []
    for audio, text in speech:
        mel, _ = encoder.features([audio])
        chars = torch.tensor([CTC_CHARS.index(c) + 1 for c in spoken(text) if c in CTC_CHARS])
        items.append((mel[0], prefix + tokenizer(text, add_special_tokens=False)["input_ids"], chars))
    # Batches of similar length: the decoder's cross-attention has no padding mask.
    items.sort(key=lambda it: it[0].shape[-1])
    groups = [items[i : i + size.batch] for i in range(0, len(items), size.batch)]
    params = [*whisper.parameters(), *ctc_head.parameters()]
    opt = torch.optim.AdamW(params, lr=1.5e-3, weight_decay=0.01)
    rng = random.Random(seed)
    saves = Checkpoint(checkpoint, {"whisper": whisper, "ctc": ctc_head, "opt": opt}, rng, CHECKPOINT_EVERY_S)
    done = _resume(saves)
    progress = Progress("whisper", size.whisper_steps, before=done)
    whisper.train()
    for step in range(done + 1, size.whisper_steps + 1):
        group = rng.choice(groups)
        mel_len = torch.tensor([m.shape[-1] for m, _, _ in group])
        mel = torch.zeros(len(group), group[0][0].shape[0], int(mel_len.max()))
        for i, (m, _, _) in enumerate(group):
            mel[i, :, : m.shape[-1]] = _spec_augment(m, m.shape[-1], rng)
        feats, lengths = encoder(mel, mel_len)
        feats = feats * (torch.arange(feats.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        ce = decoder_loss(whisper, feats, [ids for _, ids, _ in group], len(prefix), tokenizer.pad_token_id)
        chars = [c for _, _, c in group]
        ctc = torch.nn.functional.ctc_loss(
            ctc_head(feats).log_softmax(-1).transpose(0, 1),
            torch.cat(chars),
            lengths,
            torch.tensor([len(c) for c in chars]),
            zero_infinity=True,
        )
        loss = (1 - CTC_WEIGHT) * ce + CTC_WEIGHT * ctc
        for g in opt.param_groups:
            g["lr"] = _lr(step, size.whisper_steps, 1.5e-3)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress.update(step, loss.item())
        saves.save({"step": step})
    return whisper.eval()


# ---------------------------------------------------------------------- build
WORK_DIR = "work"  # speech and features of a build, inside its folder until the bundle is whole
RECIPE_FILE = "build.json"  # what a build in this folder makes: one stopped part-way goes on if the same


def _start_or_go_on(out: Path, recipe: dict) -> None:
    """Make `out` a build of `recipe`: what a build of the same recipe stopped part-way left there is
    kept (the build goes on); from anything else, the parts a build would take up are deleted."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        found = json.loads((out / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        found = None
    if found == recipe:
        _LOGGER.info("going on with the build stopped part-way in %s", out)
        return
    for name in ("llm", "whisper", WORK_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / STATE_FILE).unlink(missing_ok=True)
    write_atomic(out / RECIPE_FILE, json.dumps(recipe).encode())


def _save_whole(folder: Path, *parts: Any) -> None:
    """`save_pretrained` of each part into `folder`, which appears only once all are written."""
    tmp = folder.with_name(f"{folder.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)  # a save a kill cut short
    for part in parts:
        part.save_pretrained(tmp)
    os.replace(tmp, folder)


def build_dev_model(out: Path, size_name: str = "small", seed: int = 0) -> dict:
    """Build the dev bundle in `out`; returns the build report (times, accuracies).

    A build stopped part-way (a restart, a power cut: on a Raspberry Pi it takes hours) goes on in the same
    `out`: the LLM and Whisper, each saved whole once trained, are loaded back, and a training stopped
    inside goes on from its last save (`CHECKPOINT_EVERY_S`); the projector's training resumes from its
    last epoch (`train`); the speech it rendered whole is taken. A folder left by another recipe (size,
    seed, version) starts afresh."""
    size = SIZES[size_name]
    out = Path(out)
    _start_or_go_on(out, {"size": size_name, "seed": seed, "version": __version__})
    rng = random.Random(seed)
    households = [h for h in load_households() if h.split == "base"]
    template = PromptTemplate(DEFAULT_TEMPLATE)
    times: dict[str, float] = {}
    t_all = t = time.monotonic()

    # Speech and features go inside `out`, not in the system's temp folder (a gigabyte or more): a build
    # that goes on finds the features it computed; the folder goes once the bundle is whole.
    work = out / WORK_DIR
    train_manifest = render_once(work / "train", households, size.speech_utterances, seed)
    val_manifest = render_once(work / "val", households, size.val_utterances, seed + 1)
    heldout = load_utterances(render_once(work / "heldout", households, size.eval_utterances, seed + 2))
    speech = [(a, u.text) for u, a in load_utterances(train_manifest)]
    crowd = crowd_households(size.crowd_utterances // 20, random.Random(f"{seed}/crowd"))
    crowd_manifest = render_once(work / "crowd", crowd, size.crowd_utterances, seed + 3)
    crowd_speech = [(a, u.text) for u, a in load_utterances(crowd_manifest)]
    times["speech_s"] = time.monotonic() - t

    t = time.monotonic()
    if (out / "llm").is_dir():
        _LOGGER.info("the tokenizer and LLM of the build stopped part-way are taken as they were saved")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "llm")
        llm = Qwen2ForCausalLM.from_pretrained(out / "llm")
    else:
        examples = text_examples(households, size.llm_steps * size.batch // 2 + 1000, rng)
        texts = [format_answer(e.transcript, e.answer.intent if e.answer else None) for e in examples]
        texts += [context_text(h) for h in households] + [template.text] + [t for _, t in speech]
        # The LLM's training save holds ids of this tokenizer: a build that goes on takes the same one.
        if (work / "tokenizer").is_dir():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
        else:
            tokenizer = train_tokenizer(texts, size.vocab)
            _save_whole(work / "tokenizer", tokenizer)
        encoded = encode_llm_examples(tokenizer, template, examples, size.cast_len, rng)
        llm = train_llm(tokenizer, encoded, size, seed, work / "llm-training.safetensors")
        _save_whole(out / "llm", llm, tokenizer)
        times["llm_s"] = time.monotonic() - t

    t = time.monotonic()
    if (out / "whisper").is_dir():
        _LOGGER.info("the Whisper of the build stopped part-way is taken as it was saved")
        whisper = WhisperForConditionalGeneration.from_pretrained(out / "whisper")
    else:
        feature_extractor = WhisperFeatureExtractor(feature_size=80)
        ckpt = work / "whisper-training.safetensors"
        whisper = train_whisper(tokenizer, feature_extractor, speech + crowd_speech, size, seed, ckpt)
        _save_whole(out / "whisper", whisper, tokenizer, feature_extractor)
        times["whisper_s"] = time.monotonic() - t
    save_bundle_config(
        out, BundleConfig(encoder="whisper", llm="llm", prompt_template=template.text, projector=None)
    )

    # Align a BridgeFormer on the same speech, through the loading code real models use. The combined
    # objective: the generative loss aligns this tiny LLM far better than EmbedLink alone (held-out
    # intent accuracy 0.41 vs 0.29 in 10 minutes, RESULTS.md), and a light EmbedLink term
    # (ALIGN_EMBEDLINK_WEIGHT) keeps the outputs in the token embeddings' space. A build that goes on
    # resumes it from its last epoch (`train`'s state file).
    t = time.monotonic()
    model = SpeechLLM.load(out)
    align = TrainConfig(
        objective="combined",
        embedlink_weight=ALIGN_EMBEDLINK_WEIGHT,
        projector="bridgeformer",
        hidden_dim=size.projector_hidden,
        heads=max(2, size.projector_hidden // 64),
        cast_len=size.cast_len,
        batch=size.batch,
        max_minutes=None,  # the epochs are the budget
        max_epochs=size.align_epochs,
        seed=seed,
    )
    train(out, train_manifest, val_manifest, out, align, cache_dir=work / "features", model=model)
    (out / STATE_FILE).unlink(missing_ok=True)
    times["projector_s"] = time.monotonic() - t
    shutil.rmtree(work)
    (out / RECIPE_FILE).unlink()

    # Held-out checks on the finished bundle.
    t = time.monotonic()
    model = SpeechLLM.load(out)
    held_rng = random.Random(seed + 100)
    per_house = size.heldout_commands // len(households)
    seen = [(c, context_text(h)) for h in households for c in generate_commands(h, per_house, held_rng)]
    unseen = [
        (c, context_text(h))
        for h in (random_household(held_rng) for _ in range(size.heldout_commands // 4))
        for c in generate_commands(h, 4, held_rng)
    ]
    contexts = {h.name: context_text(h) for h in households}
    items = [(u, a, contexts[u.household]) for u, a in heldout]
    paths = {path: evaluate_items(model, items, path) for path in PATHS}
    report = {
        "size": size_name,
        "seed": seed,
        "llm_parameters": sum(p.numel() for p in llm.parameters()),
        "whisper_parameters": sum(p.numel() for p in whisper.parameters()),
        "vocab_size": len(tokenizer),
        "llm_text_intent_accuracy_seen_households": evaluate_text(model, seen),
        "llm_text_intent_accuracy_unseen_names": evaluate_text(model, unseen),
        "n_heldout_speech": len(heldout),
        **{f"{p}_{k}": r[k] for p, r in paths.items() for k in ("intent_accuracy", "wer", "latency_ms_p50")},
        **{k: round(v, 1) for k, v in times.items()},  # the stages run by this process
    }
    report["eval_s"] = round(time.monotonic() - t, 1)
    report["build_s"] = round(time.monotonic() - t_all, 1)
    cfg = load_bundle_config(out)
    cfg.metadata["dev_model"] = report
    save_bundle_config(out, cfg)
    return report
