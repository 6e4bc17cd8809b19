"""Training the household's adapters on Whisper's decoder (`model/decoder_adapter.py`): a plain loop.

The examples are encoder features as the cascade computes them (padded to 30 s where the bundle's
cascade pads; otherwise the night's feature cache's files, read batch by batch: at whisper-base a
700-utterance night's 961 clips would hold about 150 MB, computed) and the corrected transcripts; the
loss is the one the demo model's Whisper was trained with (`devmodel.decoder_logits`: cross-entropy of
the decoder writing the transcript after its start tokens). On replayed speech (other voices, rehearsed
so that the adapters do not forget them) `distill` of it is taken instead against what the adapters'
start wrote at each position (`teach`: its likeliest tokens, computed once before training): held to
what the served decoder heard there, not only to the true words, the other voices lost fewer of their
commands (`benchmarks/RESULTS.md`, "Replayed voices held to what the served decoder heard"). Batches of
similar length, AdamW, gradients clipped, `micro_batch` utterances per forward/backward (memory), for
`epochs` passes or until `max_s` seconds have gone, whichever is first. The learning rate decays along a
cosine to zero over the epochs, cut after each to those the time left holds (as the projector's,
`train.train`); training ends where it reaches zero. At a constant rate the last steps kept moving the
adapters, and they cost the other voices more of their commands (`benchmarks/RESULTS.md`, "The cascade
leans toward the household's names; the decoder adapters' rate decays").
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .devmodel import decoder_logits
from .model.decoder_adapter import Adapter, AdapterConfig, adapter_parameters, extract, fresh, install
from .model.decoder_memory import DecoderMemory
from .model.speechllm import SpeechLLM, whisper_prompt
from .train import FeatureCache, fitting_horizon, lr_factor


@dataclass
class DecoderExample:
    """One utterance for the decoder: Whisper's start tokens (of its language) followed by its
    transcript's token ids, and its encoder features `[N, D]`: held, or those the night's feature `cache`
    keeps for `clip`, read when a batch needs them (through the cache, so a file gone meanwhile, a clip
    the household deleted, is computed again; the night forgets it again as it ends)."""

    ids: list[int]
    n_prompt: int  # how many of `ids` are start tokens
    frames: int  # N
    key: str  # the clip's (`FeatureCache.key`)
    features: torch.Tensor | None = None
    clip: np.ndarray | None = None
    cache: FeatureCache | None = None
    replayed: bool = False  # another voice's, rehearsed so the adapters do not forget them
    # What the adapters' start wrote at each position of a replayed transcript: its `TEACHER_TOP`
    # likeliest tokens and their probabilities among them (`teach`), which distillation holds them to.
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self) -> torch.Tensor:
        if self.features is not None:
            return self.features
        assert self.cache is not None and self.clip is not None
        return self.cache.features([self.clip])[0]


@dataclass
class DecoderTrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch: int = 16
    micro_batch: int = 4
    max_s: float = 300.0
    seed: int = 0
    distill: float = 1.0  # weight, on replayed transcripts, of the start's words against the true ones


@dataclass
class DecoderTrainResult:
    adapter: Adapter
    steps: int
    epochs: float  # passes over the examples (a fraction when the time ran out)
    seconds: float  # the teacher's answers included
    teach_s: float  # of them (`teach`: on replayed transcripts, where `distill`)
    loss_curve: list[float] = field(default_factory=list)  # mean loss of each epoch
    lr_curve: list[float] = field(default_factory=list)  # the learning rate at the end of each epoch


def decoder_examples(
    model: SpeechLLM,
    texts: list[str],
    audios: list[np.ndarray],
    languages: list[str | None],
    cache: FeatureCache | None = None,
    replayed: list[bool] | None = None,
) -> list[DecoderExample]:
    """Transcripts and their 16 kHz audio as training examples, with the start tokens of their language
    and the features the cascade reads: from `cache` (the night's feature cache: a bundle whose cascade
    reads unpadded features), else computed (padded to 30 s where the cascade pads). A transcript longer
    than the decoder can write (`max_target_positions`, its start and end tokens counted) is left out."""
    tokenizer, limit = model.whisper_tokenizer, model.whisper.config.max_target_positions
    fitting = []  # (audio, ids, how many of them are start tokens, replayed)
    kinds = replayed or [False] * len(texts)
    for text, audio, language, kind in zip(texts, audios, languages, kinds, strict=True):
        prompt, _ = whisper_prompt(model.whisper, tokenizer, language)
        ids = prompt + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < limit:  # (and the end token)
            fitting.append((audio, ids, len(prompt), kind))
    examples = []
    for start in range(0, len(fitting), 64):  # (a cache's files: 64 clips' features in memory at most)
        chunk = fitting[start : start + 64]
        clips = [audio for audio, _, _, _ in chunk]
        if cache is not None:  # (computed where missing; read again batch by batch in training)
            examples += [
                DecoderExample(
                    ids, n_prompt, f.shape[0], FeatureCache.key(audio), clip=audio, cache=cache, replayed=kind
                )
                for f, (audio, ids, n_prompt, kind) in zip(cache.features(clips), chunk, strict=True)
            ]
        else:
            feats = [model.encode(audio, pad_30s=model.cascade_pad_30s).half().cpu() for audio in clips]
            examples += [
                DecoderExample(ids, n_prompt, f.shape[0], FeatureCache.key(audio), features=f, replayed=kind)
                for f, (audio, ids, n_prompt, kind) in zip(feats, chunk, strict=True)
            ]
    return examples


def train_decoder_adapter(
    model: SpeechLLM,
    examples: list[DecoderExample],
    cfg: DecoderTrainConfig,
    start: Adapter | None = None,
    adapter_config: AdapterConfig | None = None,
) -> DecoderTrainResult:
    """Train adapters on `model.whisper`'s decoder from `start` (the served ones) or from nothing; the
    Whisper is left serving the result."""
    if not examples:
        raise ValueError("no transcripts to train Whisper's decoder adapters on")
    whisper, tokenizer = model.whisper, model.whisper_tokenizer
    config = adapter_config or AdapterConfig()
    install(whisper, start if start is not None else fresh(whisper, config, cfg.seed), config)
    params = list(adapter_parameters(whisper).values())
    for param in params:
        param.requires_grad_(True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else whisper.config.pad_token_id
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    rng = random.Random(cfg.seed)
    steps, done, curve, lrs = 0, 0.0, [], []
    per_epoch = math.ceil(len(examples) / cfg.batch)
    horizon = cfg.epochs * per_epoch  # the steps the learning rate decays over
    start_s = time.monotonic()
    try:
        if cfg.distill:
            teach([x for x in examples if x.replayed], whisper, pad_id, cfg.micro_batch)
        t0 = time.monotonic()
        max_s = cfg.max_s - (t0 - start_s)  # what the teacher's answers left for training
        whisper.train()
        while done < cfg.epochs:
            order = sorted(range(len(examples)), key=lambda i: (examples[i].frames, rng.random()))
            groups = [order[i : i + cfg.batch] for i in range(0, len(order), cfg.batch)]
            rng.shuffle(groups)
            losses = []
            for group in groups:
                if steps >= horizon or time.monotonic() - t0 > max_s:  # (decayed to zero, or out of time)
                    break
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(steps, 0, steps / horizon)
                opt.zero_grad()
                batch = [examples[j] for j in group]
                losses.append(train_step(batch, whisper, pad_id, cfg.micro_batch, cfg.distill))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                steps += 1
            if losses:
                curve.append(round(float(np.mean(losses)), 4))
                lrs.append(float(f"{opt.param_groups[0]['lr']:.3g}"))
            done += len(losses) / len(groups)
            if len(losses) < len(groups):
                break
            if math.isfinite(max_s):  # (at this run's pace so far)
                elapsed = time.monotonic() - t0
                horizon = fitting_horizon(horizon, steps, per_epoch, max_s - elapsed, elapsed / done)
    finally:
        whisper.eval()
        for param in params:
            param.requires_grad_(False)
    return DecoderTrainResult(
        extract(whisper), steps, round(done, 2), time.monotonic() - start_s, t0 - start_s, curve, lrs
    )


@torch.no_grad()
def remember(
    whisper: torch.nn.Module, examples: list[DecoderExample], judges: frozenset[str] = frozenset()
) -> DecoderMemory:
    """The memory of `examples` (`model/decoder_memory.py`): each one's transcript read through
    `whisper`'s decoder (its adapters as served), its last hidden state kept at each step with the token
    that came next (the end token last) and the clip it came from; `judges`: the clips among them held
    out to judge nights."""
    whisper.eval()
    eos = whisper.generation_config.eos_token_id
    keys, values, owners = [], [], []
    clips = list(dict.fromkeys(x.key for x in examples))  # (a clip said twice is one clip)
    index = {key: i for i, key in enumerate(clips)}
    for x in examples:
        ids = [*x.ids, eos]
        feats = x.load()[None].to(whisper.device, whisper.dtype)
        out = whisper(
            encoder_outputs=(feats,),
            decoder_input_ids=torch.tensor([ids[:-1]], device=whisper.device),
            output_hidden_states=True,
        )
        keys.append(out.decoder_hidden_states[-1][0, x.n_prompt - 1 :].float().cpu())
        values.append(torch.tensor(ids[x.n_prompt :]))
        owners.append(torch.full((len(ids) - x.n_prompt,), index[x.key]))
    return DecoderMemory(torch.cat(keys), torch.cat(values), torch.cat(owners), clips, judges)


TEACHER_TOP = 16  # tokens a replayed transcript's position keeps of what the adapters' start wrote


def _batch_logits(
    chunk: list[DecoderExample], whisper: torch.nn.Module, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's logits `[B, T, V]` on `chunk` and the tokens it should write (`decoder_logits`)."""
    loaded = [x.load() for x in chunk]
    feats = torch.zeros(len(chunk), max(x.frames for x in chunk), loaded[0].shape[1])
    for k, (x, f) in enumerate(zip(chunk, loaded, strict=True)):
        feats[k, : x.frames] = f
    feats = feats.to(whisper.device, whisper.dtype)
    return decoder_logits(whisper, feats, [x.ids for x in chunk], [x.n_prompt for x in chunk], pad_id)


@torch.no_grad()
def teach(examples: list[DecoderExample], whisper: torch.nn.Module, pad_id: int, micro: int) -> None:
    """Keep on each example what `whisper` (its adapters' start) writes at each position of its
    transcript: the `TEACHER_TOP` likeliest tokens and their probabilities among them."""
    whisper.eval()
    micro = max(1, micro)
    for i in range(0, len(examples), micro):
        chunk = examples[i : i + micro]
        logits, labels = _batch_logits(chunk, whisper, pad_id)
        for x, row, want in zip(chunk, logits, labels, strict=True):
            top = row[want != -100].float().topk(TEACHER_TOP, dim=-1)
            x.teacher = (top.indices.cpu(), top.values.softmax(-1).cpu())


def train_step(
    batch: list[DecoderExample], whisper: torch.nn.Module, pad_id: int, micro: int, distill: float
) -> float:
    """Accumulate the gradients of one batch, `micro` utterances at a time; returns its mean loss: the
    cross-entropy of each token written. On a replayed transcript with a `teacher`, `distill` of it is
    taken against what the adapters' start wrote there (its likeliest tokens), the rest against the
    true token."""
    total, micro = 0.0, max(1, micro)
    for i in range(0, len(batch), micro):
        chunk = batch[i : i + micro]
        logits, labels = _batch_logits(chunk, whisper, pad_id)
        kept = labels != -100
        logp = logits[kept].float().log_softmax(-1)  # [M, V]: the positions written, example by example
        losses = -logp.gather(1, labels[kept].unsqueeze(1)).squeeze(1)
        taught = [(x.teacher, int(n)) for x, n in zip(chunk, kept.sum(1), strict=True)]
        if distill and any(teacher is not None for teacher, _ in taught):
            ids = torch.zeros(len(losses), TEACHER_TOP, dtype=torch.long)
            soft = torch.zeros(len(losses), TEACHER_TOP)
            weight = torch.zeros(len(losses))
            at = 0
            for teacher, n in taught:
                if teacher is not None:
                    ids[at : at + n], soft[at : at + n] = teacher
                    weight[at : at + n] = distill
                at += n
            ids, soft, weight = ids.to(logp.device), soft.to(logp.device), weight.to(logp.device)
            held = -(soft * logp.gather(1, ids)).sum(-1)
            losses = (1 - weight) * losses + weight * held
        loss = losses.mean() * len(chunk) / len(batch)
        loss.backward()
        total += loss.item()
    return total
