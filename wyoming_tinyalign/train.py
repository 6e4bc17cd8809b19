"""Alignment training of a projector between a frozen encoder and a frozen LLM.

Two objectives:
- **EmbedLink** (Tiny-Align): the projector's `T` outputs are regressed onto the LLM's *input
  embeddings* of the transcript padded to `T`; loss = MSE (relative to the embedding scale) +
  (1 - cosine). No LLM forward or backward; with cached encoder features a step is just the projector.
- **Generative** (SLAM-ASR / Ultravox style): cross-entropy of the answer (transcript + intent) through
  the frozen LLM, given the instruction-injected prompt; optionally with LoRA adapters on the LLM.

Encoder features are computed once per clip and cached on disk, keyed by the audio and the encoder's
weights. The loop is plain PyTorch: epochs, validation, early stopping, best checkpoint, resume.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .checkpoint import Checkpoint
from .evaluate import score
from .files import write_atomic
from .households import context_text, load_households
from .manifest import Utterance, load_utterances
from .model.bundle import (
    BundleConfig,
    ProjectorInfo,
    load_bundle_config,
    load_projector,
    save_bundle_config,
    save_projector,
)
from .model.encoder import AudioEncoder
from .model.projector import KINDS, Projector, ProjectorConfig, build_projector, weights_key
from .model.prompt import answer_ids
from .model.speechllm import SpeechLLM, resolve_ref

_LOGGER = logging.getLogger(__name__)
OBJECTIVES = ("embedlink", "generative", "combined")
STATE_FILE = "train-state.safetensors"


# ------------------------------------------------------------------ progress
class Progress:
    """A progress line with loss and ETA, logged at most every few seconds: "done/total", or "done"
    and `unit` when given ("57% of the budget")."""

    def __init__(
        self, name: str, total: float, every_s: float = 5.0, unit: str | None = None, before: float = 0.0
    ) -> None:
        """`before`: what a run that goes on had done already (the ETA is from this run's pace)."""
        self.name, self.total, self.every_s, self.unit, self.before = name, total, every_s, unit, before
        self.start = self.last = time.monotonic()

    def update(self, done: float, loss: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        eta = (now - self.start) / max(done - self.before, 1e-9) * (self.total - done)
        shown = f"{done:.0f}{self.unit}" if self.unit else f"{done:.0f}/{self.total:.0f}"
        _LOGGER.info("%s %s loss %.4f eta %.0fs", self.name, shown, loss, eta)


# ------------------------------------------------------------- feature cache
def encoder_fingerprint(encoder: AudioEncoder) -> str:
    """A hash of the encoder's weights and mel settings: cached features belong to exactly these."""
    digest = hashlib.sha256()
    fe = encoder.feature_extractor
    digest.update(f"{fe.feature_size}/{fe.hop_length}/{fe.n_fft}".encode())
    for name, tensor in sorted(encoder.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureCache:
    """Encoder features on disk, one safetensors file per clip, keyed by audio content and encoder."""

    def __init__(self, folder: Path, encoder: AudioEncoder, batch: int = 16) -> None:
        self.encoder, self.batch = encoder, batch
        self.fingerprint = encoder_fingerprint(encoder)
        self.folder = Path(folder) / self.fingerprint
        self.encoder_calls = 0

    @staticmethod
    def key(audio: np.ndarray) -> str:
        """A clip's key: the digest of its float32 samples."""
        return hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).hexdigest()

    def path(self, audio: np.ndarray) -> Path:
        """The file a clip's features are kept in."""
        key = self.key(audio)
        return self.folder / key[:2] / f"{key}.safetensors"

    def features(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """`[N_i, Da]` features of each clip, from the cache where it has them.

        They are half precision, as stored: a night holds hundreds of clips' features in memory, and a
        clip computed now gives what the cache will give later (`collate` and the projector widen them)."""
        paths = [self.path(a) for a in audios]
        out: list[torch.Tensor | None] = [None] * len(audios)
        misses = []
        for i, path in enumerate(paths):
            try:
                out[i] = load_file(str(path))["features"]
            except (OSError, SafetensorError, KeyError):  # missing or damaged: recompute
                misses.append(i)
        misses.sort(key=lambda i: len(audios[i]))  # similar lengths batch with little padding
        for start in range(0, len(misses), self.batch):
            chunk = misses[start : start + self.batch]
            feats, lengths = self.encoder.encode([audios[i] for i in chunk])
            self.encoder_calls += 1
            for i, f, n in zip(chunk, feats, lengths, strict=True):
                out[i] = f[: int(n)].half().cpu().contiguous()
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                write_atomic(paths[i], save({"features": out[i]}))
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------- batches
@dataclass
class Example:
    """One training utterance: its cached features and what the LLM should answer."""

    features: torch.Tensor
    utterance: Utterance
    context: str


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad features to float32 `[B, N, Da]` with their lengths."""
    lengths = torch.tensor([len(e.features) for e in examples])
    batch = torch.zeros(len(examples), int(lengths.max()), examples[0].features.shape[-1])
    for i, e in enumerate(examples):
        batch[i, : len(e.features)] = e.features
    return batch, lengths


def embedlink_loss(
    model: SpeechLLM, out: torch.Tensor, out_lengths: torch.Tensor, examples: list[Example]
) -> torch.Tensor:
    """MSE (relative to the embedding scale) + (1 - cosine) against the transcript's embeddings padded
    to each item's output length."""
    table = model.llm.get_input_embeddings().weight
    pad = model.tokenizer.pad_token_id
    ids = torch.full(out.shape[:2], pad, dtype=torch.long)
    for i, e in enumerate(examples):
        text = model.text_ids(e.utterance.text)[: int(out_lengths[i])]
        ids[i, : len(text)] = torch.tensor(text, dtype=torch.long)
    target = table[ids.to(table.device)].detach().to(out.dtype)
    scale = target.pow(2).mean()
    mse = (out - target).pow(2).mean(-1) / scale
    cos = 1 - nn.functional.cosine_similarity(out, target, dim=-1)
    mask = (
        torch.arange(out.shape[1], device=out.device)[None, :] < out_lengths[:, None].to(out.device)
    ).float()
    return ((mse + cos) * mask).sum() / mask.sum()


def target_ids(model: SpeechLLM, utterance: Utterance) -> list[int]:
    """The answer the generative loss teaches for an utterance (the transcript line alone when its label
    does not give the intent)."""
    return answer_ids(model.tokenizer, utterance.text, utterance.intent, utterance.transcript_only)


def generative_loss(
    model: SpeechLLM, out: torch.Tensor, out_lengths: torch.Tensor, examples: list[Example]
) -> torch.Tensor:
    """Cross-entropy of the answer through the frozen LLM, the audio in the prompt's audio slot.

    With the LLM frozen, the prompt before the slot is the same for every utterance of a household: the
    LLM starts from its cached KV (`SpeechLLM.prefix_cache`) and runs from the audio on, one call per
    household in the batch. With LoRA on the LLM the prefix changes at every step and runs each time.
    """
    frozen = not any(p.requires_grad for p in model.llm.parameters())
    households: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        households.setdefault(e.context, []).append(i)
    total, count = out.new_zeros(()), 0
    for context, members in households.items():
        prefix = model.prefix_cache(context) if frozen else None
        rows, labels = [], []
        for i in members:
            prompt, slot = model.prompt_embeds(out[i, : int(out_lengths[i])], context)
            if prefix is not None:
                prompt = prompt[:, slot.start :]
            answer = target_ids(model, examples[i].utterance)
            rows.append(torch.cat([prompt[0], model.embed_tokens(answer).detach()]))
            labels.append(torch.tensor([-100] * prompt.shape[1] + answer, device=out.device))
        embeds = pad_sequence(rows, batch_first=True)
        label_t = pad_sequence(labels, batch_first=True, padding_value=-100)
        mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
        mask = mask.to(embeds.device)
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(rows))
            mask = torch.cat([mask.new_ones(len(rows), cache.get_seq_length()), mask], dim=1)
        targets = label_t[:, 1:]  # position t predicts token t + 1
        # Only positions that predict an answer token go through the LM head (a real LLM's vocabulary
        # makes that head the largest matrix product of the step).
        keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask, cache=cache, logits_to_keep=keep).logits
        total = total + nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=-100, reduction="sum"
        )
        count += int((targets != -100).sum())
    return total / max(count, 1)


def combined_loss(
    model: SpeechLLM,
    out: torch.Tensor,
    out_lengths: torch.Tensor,
    examples: list[Example],
    embedlink_weight: float = 1.0,
) -> torch.Tensor:
    """Generative + `embedlink_weight` x EmbedLink: the LLM's answer decides, while the outputs stay
    near the token embeddings (so that the readout path still works)."""
    return generative_loss(model, out, out_lengths, examples) + embedlink_weight * embedlink_loss(
        model, out, out_lengths, examples
    )


LossFn = Callable[[SpeechLLM, torch.Tensor, torch.Tensor, list[Example]], torch.Tensor]


def objective_loss(objective: str, embedlink_weight: float = 1.0) -> LossFn:
    """The loss of an objective (`OBJECTIVES`); `embedlink_weight` weighs the EmbedLink term of
    `combined`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if objective == "combined":
        return functools.partial(combined_loss, embedlink_weight=embedlink_weight)
    return {"embedlink": embedlink_loss, "generative": generative_loss}[objective]


def micro_batches(
    model: SpeechLLM, examples: list[Example], size: int | None
) -> list[tuple[list[Example], float]]:
    """`examples` in runs of `size` (None or 0: one run), each with its share of their answer tokens: the
    weight that makes the runs' losses add up to the generative loss of all of them at once (a mean over
    answer tokens); an EmbedLink term, a mean over output positions, comes out nearly the same.

    The runs go household by household: the generative loss runs the LLM once per household in a run."""
    if size is not None and size < 0:
        raise ValueError(f"a micro-batch holds at least 1 utterance, not {size}")
    if not size or size >= len(examples):
        return [(examples, 1.0)]
    ordered = sorted(examples, key=lambda e: e.context)
    runs = [ordered[start : start + size] for start in range(0, len(ordered), size)]
    tokens = [sum(len(target_ids(model, e.utterance)) for e in r) for r in runs]
    return [(run, n / max(1, sum(tokens))) for run, n in zip(runs, tokens, strict=True)]


def train_step(
    model: SpeechLLM,
    projector: Projector,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss_fn: LossFn,
    batch: list[Example],
    micro_batch: int | None = None,
) -> float:
    """One optimizer step on one batch; returns the loss.

    `micro_batch` utterances at a time go forward and backward (`micro_batches`): the activations an
    LLM in the loop keeps for the backward pass grow with it, the update does not.
    """
    opt.zero_grad()
    total = 0.0
    for chunk, share in micro_batches(model, batch, micro_batch):
        total += _backward(model, projector, loss_fn, chunk, share)
    nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return total


def _backward(
    model: SpeechLLM, projector: Projector, loss_fn: LossFn, chunk: list[Example], share: float
) -> float:
    """Forward and backward of `chunk`, its loss weighed by `share`; returns that loss."""
    feats, lengths = collate(chunk)
    out, out_lengths = projector(feats.to(model.device), lengths.to(model.device))
    loss = loss_fn(model, out, out_lengths, chunk) * share
    loss.backward()
    return float(loss.detach())


def utterance_seconds(
    model: SpeechLLM, projector: Projector, loss_fn: LossFn, examples: list[Example]
) -> float:
    """Seconds one utterance takes forward and backward through the LLM into `projector`, one at a time
    (the median over `examples`; the weights do not change): what a training step costs an utterance."""
    times = []
    projector.train()
    try:
        for example in examples:
            t0 = time.perf_counter()
            _backward(model, projector, loss_fn, [example], 1.0)
            times.append(time.perf_counter() - t0)
    finally:
        projector.zero_grad(set_to_none=True)
        projector.eval()
    return float(np.median(times))


@torch.no_grad()
def val_loss(
    model: SpeechLLM, projector: Projector, examples: list[Example], loss_fn: LossFn, batch: int
) -> float:
    """The training loss of a projector on examples, `batch` at a time (leaves it in eval mode)."""
    projector.eval()
    total = 0.0
    for chunk, share in micro_batches(model, examples, batch):
        feats, lengths = collate(chunk)
        out, out_lengths = projector(feats.to(model.device), lengths.to(model.device))
        total += float(loss_fn(model, out, out_lengths, chunk)) * share
    return round(total, 5)


# ------------------------------------------------------------------- config
CURVE_POINTS = 100  # the loss curve a run returns keeps at most this many points


@dataclass
class TrainConfig:
    """Everything that decides a training run (stored with the result)."""

    objective: str = "embedlink"
    embedlink_weight: float = 1.0  # of the EmbedLink term in the combined objective
    projector: str = "bridgeformer"
    cast_len: int = 24
    stack: int = 4
    hidden_dim: int = 256
    layers: int = 2
    heads: int = 4
    lora_r: int = 0
    batch: int = 16
    micro_batch: int | None = None  # utterances per forward/backward pass (None: the whole batch)
    lr: float = 1e-3
    warmup: int = 50
    lr_floor: float = 0.05  # after warm-up the rate decays (cosine, over the budget) to this fraction of lr
    max_minutes: float | None = 10.0  # None: no time limit (the epochs are the budget)
    max_epochs: int | None = 200  # None: no epoch limit (the time is the budget)
    patience: int = 4
    val_every_s: float = 0.0  # validate at the end of an epoch when this long has passed (0: every epoch)
    seed: int = 0
    context: bool = True
    val_answers: bool = True  # False: validate on the loss only (the caller scores answers itself)


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    loss_curve: list[list[float]] = field(default_factory=list)  # [training seconds, loss], evenly spaced
    steps: int = 0
    step_ms: float = 0.0
    encoder_calls: int = 0
    seconds: float = 0.0


def lr_factor(step: int, warmup: int, progress: float, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to `floor` as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fitting_horizon(horizon: float, step: int, steps_per_epoch: int, left_s: float, epoch_s: float) -> float:
    """`horizon` (the step a learning rate decays to its floor at), cut to the epochs that `left_s`
    seconds still hold at `epoch_s` an epoch (one at least): read after each epoch, so that a run the
    time does not cut decays over its steps alone, the same every time."""
    fit = math.floor(left_s / max(epoch_s, 1e-9))
    return min(horizon, step + max(1, fit) * steps_per_epoch)


def better(m: dict, best: dict | None) -> bool:
    """Whether validation `m` beats the kept checkpoint: intent accuracy first, then the loss."""
    return best is None or (m.get("intent_accuracy") or 0, -m["val_loss"]) > (
        best.get("intent_accuracy") or 0,
        -best["val_loss"],
    )


def made_progress(m: dict, best: dict | None, min_val_loss: float | None) -> bool:
    """Whether validation `m` resets early stopping's patience.

    It does when it beats the kept checkpoint or lowers the validation loss: intent accuracy on a
    small validation set is too noisy to stop on alone while the loss still falls.
    """
    return better(m, best) or min_val_loss is None or m["val_loss"] < min_val_loss


def data_hash(utterances: list[Utterance], features: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for u, f in zip(utterances, features, strict=True):
        intent = u.intent.to_text() if u.intent else "?" if u.transcript_only else ""
        digest.update(f"{u.text}\t{intent}\t{tuple(f.shape)}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------- save and resume
def llm_fingerprint(llm: nn.Module) -> str:
    """A hash of 256 evenly spaced rows of the LLM's input embeddings: tells one LLM from another
    without reading all its weights."""
    table = llm.get_input_embeddings().weight.detach()
    rows = table[:: max(1, table.shape[0] // 256)].cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(table.shape)}".encode())
    digest.update(rows.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def _write_bundle(
    out: Path, src_cfg: BundleConfig, projector: Projector, info: ProjectorInfo, lora: bool, meta: dict
) -> None:
    """A bundle in `out` that loads as it is: backbones referenced relative to it (or by hub id)."""
    save_projector(out / "projector.safetensors", projector, info)
    cfg = BundleConfig(
        encoder=info.encoder,
        llm=info.llm,
        prompt_template=src_cfg.prompt_template,
        cascade_pad_30s=src_cfg.cascade_pad_30s,
        lora="lora" if lora else None,
        metadata={**src_cfg.metadata, "training": meta},
    )
    save_bundle_config(out, cfg)


def _relative_ref(src: Path, ref: str, out: Path) -> str:
    resolved = resolve_ref(src, ref)
    return os.path.relpath(resolved, out) if Path(resolved).is_dir() else ref


# --------------------------------------------------------------------- loop
def setup_projector(
    model: SpeechLLM, cfg: TrainConfig, init_projector: Path | None = None
) -> tuple[Projector, list[nn.Parameter]]:
    """A new (or given) projector set in `model`, LoRA on its LLM if asked; returns trainable params."""
    if init_projector:
        projector, _ = load_projector(init_projector, model.device)
    else:
        proj_cfg = ProjectorConfig(
            kind=cfg.projector,
            input_dim=model.encoder.dim,
            output_dim=model.llm.config.hidden_size,
            embed_norm=float(model.llm.get_input_embeddings().weight.detach().norm(dim=-1).mean()),
            stack=cfg.stack,
            hidden_dim=cfg.hidden_dim,
            cast_len=cfg.cast_len,
            layers=cfg.layers,
            heads=cfg.heads,
        )
        projector = build_projector(proj_cfg).to(model.device)
    params = list(projector.parameters())
    if cfg.lora_r:
        lora_cfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
        )
        model.llm = get_peft_model(model.llm, lora_cfg)
        params += [p for p in model.llm.parameters() if p.requires_grad]
    model.projector = projector
    return projector, params


def train(
    model_dir: Path,
    train_manifest: Path,
    val_manifest: Path,
    out: Path,
    cfg: TrainConfig,
    *,
    cache_dir: Path,
    households_file: Path | None = None,
    init_projector: Path | None = None,
    model: SpeechLLM | None = None,
) -> TrainResult:
    """Train a projector; writes a loadable bundle with the best one to `out`."""
    if cfg.max_minutes is None and cfg.max_epochs is None:
        raise ValueError("a training run needs a budget: max_minutes, max_epochs or both")
    t_start = time.monotonic()
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    model = model or SpeechLLM.load(model_dir)
    src_cfg = load_bundle_config(model_dir)
    enc_ref, llm_ref = (_relative_ref(model_dir, r, out) for r in (src_cfg.encoder, src_cfg.llm))

    contexts = {h.name: context_text(h) for h in load_households(households_file)} if cfg.context else {}
    cache = FeatureCache(cache_dir, model.encoder, batch=cfg.batch)

    def examples(manifest: Path) -> list[Example]:
        loaded = load_utterances(manifest)
        if not loaded:
            raise ValueError(f"{manifest} has no readable utterance")
        feats = cache.features([a for _, a in loaded])
        return [Example(f, u, contexts.get(u.household, "")) for (u, _), f in zip(loaded, feats, strict=True)]

    train_set, val_set = examples(train_manifest), examples(val_manifest)

    projector, params = setup_projector(model, cfg, init_projector)
    proj_cfg = projector.cfg
    loss_fn = objective_loss(cfg.objective, cfg.embedlink_weight)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    hash_ = data_hash([e.utterance for e in train_set], [e.features for e in train_set])

    state = {
        "epoch": 0,
        "step": 0,
        "best": None,
        "bad_epochs": 0,
        "history": [],
        "loss_curve": [],
        "curve_stride": 1,
        "wall_s": 0.0,  # for the time budget across resumes
        "step_s": 0.0,
    }
    state_path = out / STATE_FILE
    start = {
        "encoder": cache.fingerprint,
        "llm": llm_fingerprint(model.llm),
        "init": weights_key(projector) if init_projector is not None else None,
    }
    budget = ("max_minutes", "max_epochs", "patience", "val_every_s")  # a resumed run may get more
    what = {k: v for k, v in asdict(cfg).items() if k not in budget}
    fingerprint = json.dumps({**what, "data": hash_, **start}, sort_keys=True)
    # Each epoch's end is saved: projector, LoRA adapters, optimizer moments and the loop's position.
    saves = Checkpoint(state_path, {"projector": projector, "llm": model.llm, "opt": opt})
    saved = saves.read()
    if saved and saved.state.get("config") == fingerprint:
        saves.restore(saved)
        state = saved.state
        _LOGGER.info("resuming from epoch %d, step %d", state["epoch"], state["step"])
    elif saved:
        _LOGGER.info("%s holds a run of other settings, data or backbones: starting afresh", out)
    state["config"] = fingerprint

    def validate() -> dict:
        if cfg.lora_r:  # no LoRA dropout, and prompt prefixes cached from the LLM as it is now
            model.llm.eval()
            model.prefix_cache.cache_clear()
        metrics = {"val_loss": val_loss(model, projector, val_set, loss_fn, cfg.micro_batch or cfg.batch)}
        if cfg.val_answers:
            aligned = score(
                [(e.utterance, model.run_features(e.features, "aligned", e.context)) for e in val_set]
            )
            readout = score(
                [(e.utterance, model.run_features(e.features, "readout", with_intent=False)) for e in val_set]
            )
            metrics |= {
                "wer": aligned["wer"],
                "intent_accuracy": aligned["intent_accuracy"],
                "intent_name_accuracy": aligned["intent_name_accuracy"],
                "readout_wer": readout["wer"],
            }
        projector.train()
        if cfg.lora_r:
            model.llm.train()
        return metrics

    budget_s = math.inf if cfg.max_minutes is None else cfg.max_minutes * 60
    max_epochs = math.inf if cfg.max_epochs is None else cfg.max_epochs
    steps_per_epoch = max(1, len(train_set) // cfg.batch)
    step_times: list[float] = []
    projector.train()
    if cfg.lora_r:
        model.llm.train()
    t_loop = t_start - state["wall_s"]  # the budget counts this run's set-up too (loading, features)

    def spent() -> float:
        """The share of the budget used (the progress line): time or epochs, whichever ends first."""
        return max(
            (time.monotonic() - t_loop) / max(budget_s, 1e-9),
            state["step"] / (max_epochs * steps_per_epoch),
        )

    # The steps the learning rate decays over: the epoch cap, cut after each epoch to what the time
    # budget is expected to hold. Read from steps, not from the clock, so that a run the time budget
    # does not cut is the same run every time (the same data and seed give the same projector).
    horizon = max_epochs * steps_per_epoch

    name, unit = f"train {cfg.objective}/{proj_cfg.kind}", "% of the budget"
    progress = Progress(name, 100, every_s=10, unit=unit, before=100 * spent())  # > 0 when resumed

    def checkpoint(train_loss: float | None) -> None:
        """Validate; keep the projector when it is the best so far; count patience."""
        metrics = {"epoch": state["epoch"], "step": state["step"], "train_loss": train_loss}
        t0 = time.monotonic()
        metrics.update(validate())
        state["val_s"] = time.monotonic() - t0
        metrics["elapsed_s"] = round(time.monotonic() - t_loop, 1)
        metrics["train_s"] = round(state["step_s"], 1)  # optimizer steps only, without validation
        metrics["lr"] = opt.param_groups[0]["lr"]
        min_val_loss = min((h["val_loss"] for h in state["history"]), default=None)
        state["bad_epochs"] = (
            0 if made_progress(metrics, state["best"], min_val_loss) else state["bad_epochs"] + 1
        )
        state["history"].append(metrics)
        _LOGGER.info("epoch %d: %s", state["epoch"], json.dumps(metrics))
        if better(metrics, state["best"]):
            state["best"] = metrics
            info = ProjectorInfo(
                proj_cfg, enc_ref, llm_ref, data_hash=hash_, trained=True, metrics=metrics,
                objective=cfg.objective, embedlink_weight=cfg.embedlink_weight,
            )  # fmt: skip
            meta = {"config": asdict(cfg), "train_manifest": str(train_manifest), "best": metrics}
            _write_bundle(out, src_cfg, projector, info, bool(cfg.lora_r), meta)
            if cfg.lora_r:
                model.llm.save_pretrained(out / "lora")

    if init_projector is not None and not state["history"]:
        # The starting point is a candidate too: a fine-tune that only makes things worse keeps it.
        checkpoint(None)
    last_validation = t_epochs = time.monotonic()
    first_epoch, loss_value = state["epoch"], float("nan")  # (a resumed run's pace counts from here)
    while state["epoch"] < max_epochs and state["bad_epochs"] < cfg.patience:
        rng = random.Random(cfg.seed * 1000 + state["epoch"])
        order = list(range(len(train_set)))
        rng.shuffle(order)
        out_of_time = False
        for b in range(steps_per_epoch):
            t0 = time.perf_counter()
            decayed = state["step"] / horizon if math.isfinite(horizon) else 0.0
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(state["step"], cfg.warmup, decayed, cfg.lr_floor)
            batch = [train_set[i] for i in order[b * cfg.batch : (b + 1) * cfg.batch]]
            loss_value = train_step(model, projector, opt, params, loss_fn, batch, cfg.micro_batch)
            state["step"] += 1
            step_times.append(time.perf_counter() - t0)
            state["step_s"] += step_times[-1]
            if state["step"] % state["curve_stride"] == 0:  # at most CURVE_POINTS, evenly spaced
                curve = state["loss_curve"]
                curve.append([round(state["step_s"], 2), round(loss_value, 5)])
                if len(curve) > CURVE_POINTS:
                    del curve[1::2]
                    state["curve_stride"] *= 2
            progress.update(min(100.0, 100 * spent()), loss_value)
            # Stop while another step and the closing validation still fit in the time budget.
            if time.monotonic() - t_loop + step_times[-1] + state.get("val_s", 0.0) > budget_s:
                out_of_time = True
                break
        state["epoch"] += 1
        finished = out_of_time or state["epoch"] >= max_epochs
        if finished or time.monotonic() - last_validation >= cfg.val_every_s:
            last_validation = time.monotonic()
            checkpoint(round(loss_value, 5))
        state["wall_s"] = time.monotonic() - t_loop
        saves.save(state)
        if out_of_time:
            break
        if math.isfinite(budget_s):  # (at this run's pace so far)
            epoch_s = (time.monotonic() - t_epochs) / max(1, state["epoch"] - first_epoch)
            left_s = budget_s - (time.monotonic() - t_loop)
            horizon = fitting_horizon(horizon, state["step"], steps_per_epoch, left_s, epoch_s)
    return TrainResult(
        out=out,
        best=state["best"] or {},
        history=state["history"],
        loss_curve=state["loss_curve"],
        steps=state["step"],
        step_ms=1000 * float(np.median(step_times)) if step_times else math.nan,
        encoder_calls=cache.encoder_calls,
        seconds=time.monotonic() - t_start,
    )


# ---------------------------------------------------------------------- CLI
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wyoming-tinyalign" / "features"


def add_micro_batch_arg(parser: argparse.ArgumentParser, default: int | None) -> None:
    """`--micro-batch`, shared by `train` and `adapt`."""
    parser.add_argument(
        "--micro-batch", type=int, default=default,
        help="utterances per forward/backward pass (less memory with the LLM in the loop; 0: all at once)",
    )  # fmt: skip


def add_train_args(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--model", required=True, type=Path, help="bundle with the backbones to align")
    parser.add_argument("--manifest", required=True, type=Path, help="training manifest.jsonl")
    parser.add_argument("--val", required=True, type=Path, help="validation manifest.jsonl")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write (resumes if present)")
    parser.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    parser.add_argument(
        "--embedlink-weight", type=float, default=d.embedlink_weight,
        help="weight of the EmbedLink term in the combined objective",
    )  # fmt: skip
    parser.add_argument("--projector", choices=KINDS, default=d.projector)
    parser.add_argument(
        "--lora-r", type=int, default=d.lora_r, help="LoRA rank on the LLM (generative; 0: off)"
    )
    parser.add_argument("--cast-len", type=int, default=d.cast_len, help="BridgeFormer output length T")
    parser.add_argument("--layers", type=int, default=d.layers, help="BridgeFormer transformer layers")
    parser.add_argument("--stack", type=int, default=d.stack, help="encoder frames stacked per input")
    parser.add_argument("--hidden-dim", type=int, default=d.hidden_dim)
    parser.add_argument("--batch", type=int, default=d.batch)
    add_micro_batch_arg(parser, d.micro_batch)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument(
        "--lr-floor", type=float, default=d.lr_floor, help="fraction of --lr the rate decays to (1: constant)"
    )
    parser.add_argument("--max-minutes", type=float, default=d.max_minutes, help="time budget")
    parser.add_argument("--max-epochs", type=int, default=d.max_epochs)
    parser.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="validations without a better checkpoint or a lower validation loss before stopping",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-context", action="store_true", help="train without household context")
    parser.add_argument("--init-projector", type=Path, help="start from this projector checkpoint")
    parser.add_argument("--households", type=Path, help="households file for context (default: packaged)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="encoder feature cache")


def run_train(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        objective=args.objective,
        embedlink_weight=args.embedlink_weight,
        projector=args.projector,
        cast_len=args.cast_len,
        stack=args.stack,
        hidden_dim=args.hidden_dim,
        layers=args.layers,
        lora_r=args.lora_r,
        batch=args.batch,
        micro_batch=args.micro_batch,
        lr=args.lr,
        lr_floor=args.lr_floor,
        max_minutes=args.max_minutes,
        max_epochs=args.max_epochs,
        patience=args.patience,
        seed=args.seed,
        context=not args.no_context,
    )
    if cfg.lora_r and cfg.objective == "embedlink":
        raise ValueError("--lora-r needs an objective that runs the LLM (EmbedLink never does)")
    result = train(
        args.model,
        args.manifest,
        args.val,
        args.out,
        cfg,
        cache_dir=args.cache_dir,
        households_file=args.households,
        init_projector=args.init_projector,
        model=SpeechLLM.load(args.model, device=args.device),
    )
    print(json.dumps({"out": str(result.out), "best": result.best, "steps": result.steps,
                      "step_ms": round(result.step_ms, 1), "seconds": round(result.seconds, 1)}))  # fmt: skip
    return 0
