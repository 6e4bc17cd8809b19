"""Ways of adapting Whisper's *decoder* (the cascade's ear) to a household, side by side.

    python benchmarks/decoder_adaptation.py --model /tmp/readme/data/models/dev-small --work /tmp/bench-dec \
        [--lr 5e-4] [--epochs 5,10,20] [--lora-rank 0] [--replay-n 100] [--seed 0] [--encoder-layers 0] \
        [--labelled 100] [--speed-perturb 0.9,1.1]
    python benchmarks/decoder_adaptation.py --real-size-steps 20 --threads 2 [--lora-rank 16]

The nights adapt the decoder with LoRA adapters (`model/decoder_adapter.py`, `adapt --decoder-epochs`);
this compares that with other choices outside the job. For each unseen household, the same 100 labelled
and 50 held-out utterances as `personalization.py` (same seeds): the decoder (whole, or the nightly
job's adapters at `--lora-rank`) is fine-tuned on the household's 100 corrected transcripts and
`--replay-n` base-household utterances (the night's replay speech), batch 16, AdamW, the encoder frozen
(`--encoder-layers N`: but its top N layers and final norm); after each of `--epochs` the cascade (this
decoder's transcript, then the frozen LLM's intent from it, with the household's context) is scored on
the household's 50 held-out utterances and on the night's 60 general base-household utterances. Prints a
markdown table and writes WORK/decoder_adaptation.json.

`--real-size-steps N` instead times N such training steps (batch 16, 150 encoder frames, 24 decoder
tokens each) on whisper-base's decoder (`realsize.whisper_base`, random weights): what a night's decoder
training costs at real size, learning the replayed transcripts' true words and distilled, by turns.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from confidence import answer, shares
from realsize import whisper_base

from wyoming_tinyalign.adapt import GENERAL_SEED, REPLAY_SEED, bootstrap_speech
from wyoming_tinyalign.assistant import DEFAULT_MIN_CONFIDENCE
from wyoming_tinyalign.decoder_train import DecoderExample, teach, train_step
from wyoming_tinyalign.devmodel import decoder_loss
from wyoming_tinyalign.evaluate import score
from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.manifest import load_utterances
from wyoming_tinyalign.model.decoder_adapter import AdapterConfig, adapter_parameters, attach
from wyoming_tinyalign.model.speechllm import SpeechLLM, whisper_prompt
from wyoming_tinyalign.synth import render_once

Example = tuple[torch.Tensor, list[int]]  # features [N, Da] (or log-mel [mels, F]), decoder ids


def cascade_score(model: SpeechLLM, items: list, contexts: dict[str, str]) -> dict:
    """Cascade intent accuracy and WER of (utterance, features) items, and what the server would do with
    the intents at the default `--min-confidence`: `acted` right, wrong, withheld (`confidence.shares`)."""
    results = [(u, model.run_features(f, "cascade", contexts[u.household])) for u, f in items]
    report = score(results)
    acted = shares([answer(u, r) for u, r in results if u.intent is not None], DEFAULT_MIN_CONFIDENCE)
    return {"intent_accuracy": report["intent_accuracy"], "wer": report["wer"], "acted": acted}


def trainable_decoder(whisper: torch.nn.Module, lora_rank: int) -> None:
    """Freeze Whisper but its decoder: the whole decoder, or the nightly job's LoRA adapters
    (`model/decoder_adapter.py`) at `lora_rank`."""
    whisper.requires_grad_(False)
    if not lora_rank:
        whisper.model.decoder.requires_grad_(True)
        return
    attach(whisper, AdapterConfig(rank=lora_rank, alpha=2 * lora_rank))
    for param in adapter_parameters(whisper).values():
        param.requires_grad_(True)


def real_size_step_s(args: argparse.Namespace) -> dict:
    """Seconds per decoder training step at whisper-base's shapes (the night's own step: 16 utterances,
    4 of 5 replayed, `micro_batch` 4), learning the replayed transcripts' true words and distilled
    (`decoder_train.train_step`), steps taken by turns; the teacher's answers; the process's peak RSS."""
    whisper = whisper_base()
    trainable_decoder(whisper, args.lora_rank)
    params = [p for p in whisper.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    pad_id = whisper.config.pad_token_id
    batch = [  # 150 frames; 4 prompt + 20 words' ids
        DecoderExample(
            torch.randint(0, whisper.config.vocab_size, (24,)).tolist(), 4, 150, f"{i:064x}",
            features=torch.randn(150, whisper.config.d_model).half(), replayed=i % 5 != 0,
        )
        for i in range(16)
    ]  # fmt: skip
    t0 = time.perf_counter()
    teach([x for x in batch if x.replayed], whisper, pad_id, 4)
    teach_s = time.perf_counter() - t0
    whisper.train()
    times: dict[float, list[float]] = {0.0: [], 1.0: []}
    for _ in range(args.real_size_steps + 2):  # the first two of each warm up
        for distill, taken in times.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            train_step(batch, whisper, pad_id, 4, distill)
            opt.step()
            taken.append(time.perf_counter() - t0)
    step_s = {distill: sum(taken[2:]) / args.real_size_steps for distill, taken in times.items()}
    return {
        "trained_parameters": sum(p.numel() for p in params),
        "step_s": round(step_s[0.0], 3),
        "distilled_step_s": round(step_s[1.0], 3),
        "distilled_ratio": round(step_s[1.0] / step_s[0.0], 3),
        "teach_s": round(teach_s, 3),
        "teach_utterances": sum(x.replayed for x in batch),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def train_epoch(
    model: SpeechLLM, examples: list[Example], opt: torch.optim.Optimizer, rng: random.Random, mels: bool
) -> None:
    """One pass over `examples` in batches of 16 of similar length, with the loss the dev model's Whisper
    was trained with (`devmodel.decoder_loss`). With `mels`, the examples hold log-mel frames `[mels, F]`
    and the encoder (its trainable top layers) runs too."""
    whisper, tokenizer = model.whisper, model.whisper_tokenizer
    prompt, _ = whisper_prompt(whisper, tokenizer, "en")
    order = sorted(
        range(len(examples)), key=lambda i: (examples[i][0].shape[-1 if mels else 0], rng.random())
    )
    groups = [order[i : i + 16] for i in range(0, len(order), 16)]
    rng.shuffle(groups)
    params = [p for p in whisper.parameters() if p.requires_grad]
    whisper.train()
    for group in groups:
        batch = [examples[i] for i in group]
        if mels:
            lengths = torch.tensor([x.shape[-1] for x, _ in batch])
            mel = torch.zeros(len(batch), batch[0][0].shape[0], int(lengths.max()))
            for i, (x, _) in enumerate(batch):
                mel[i, :, : x.shape[-1]] = x
            feats, frames = model.encoder(mel, lengths)
            feats = feats * (torch.arange(feats.shape[1])[None, :] < frames[:, None]).unsqueeze(-1)
        else:
            feats = torch.zeros(len(batch), max(x.shape[0] for x, _ in batch), batch[0][0].shape[1])
            for i, (x, _) in enumerate(batch):
                feats[i, : x.shape[0]] = x
        loss = decoder_loss(whisper, feats, [seq for _, seq in batch], len(prompt), tokenizer.pad_token_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    whisper.eval()


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
    """The clip played `factor` times as fast (shorter and higher above 1), by linear interpolation."""
    n = int(len(audio) / factor)
    return np.interp(np.arange(n) * factor, np.arange(len(audio)), audio).astype(np.float32)


def adapt_household(args: argparse.Namespace, index: int, name: str, replay: list, general: list) -> dict:
    """Decoder fine-tuning for one household, scored after each of `args.epochs`."""
    household = next(h for h in load_households() if h.name == name)
    contexts = {h.name: context_text(h) for h in load_households()}
    work = args.work / name
    # personalization.py's seeds: night 1's labelled utterances and the held-out ones
    labelled = load_utterances(render_once(work / "labelled", [household], args.labelled, 100 + index))
    heldout = load_utterances(render_once(work / "heldout", [household], args.heldout, 200 + index))
    model = SpeechLLM.load(args.model)
    trainable_decoder(model.whisper, args.lora_rank)
    encoder = model.whisper.model.encoder
    if args.encoder_layers:  # its top layers and final norm train too
        for module in [*encoder.layers[-args.encoder_layers :], encoder.layer_norm]:
            module.requires_grad_(True)
    trained = sum(p.numel() for p in model.whisper.parameters() if p.requires_grad)
    tokenizer = model.whisper_tokenizer
    prompt, _ = whisper_prompt(model.whisper, tokenizer, "en")

    def features(items: list) -> list:
        return [(u, model.encode(audio)) for u, audio in items]

    def source(audio: np.ndarray) -> torch.Tensor:
        """What a training example keeps: log-mel when the encoder trains, else its (fixed) features."""
        return model.encoder.features([audio])[0][0] if args.encoder_layers else model.encode(audio)

    # `--speed-perturb`: each corrected utterance again at these speeds (tempo and pitch, as resampled)
    perturbed = [(u, speed_perturb(audio, f)) for f in args.speed_perturb for u, audio in labelled]
    examples = [
        (source(audio), prompt + tokenizer(u.text, add_special_tokens=False)["input_ids"])
        for u, audio in labelled + perturbed + replay
    ]
    opt = torch.optim.AdamW(
        [p for p in model.whisper.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01
    )
    rng = random.Random(1000 * args.seed + index)  # the batches' order
    frozen = None if args.encoder_layers else (features(heldout), features(general))  # computed once
    rows, done, train_s = [], 0, 0.0
    for epochs in [0, *args.epochs]:
        t0 = time.monotonic()
        while done < epochs:
            train_epoch(model, examples, opt, rng, mels=bool(args.encoder_layers))
            done += 1
        train_s += time.monotonic() - t0
        held_f, general_f = frozen or (features(heldout), features(general))
        row = {
            "epochs": epochs,
            "train_s": round(train_s, 1),
            "household": cascade_score(model, held_f, contexts),
            "general": cascade_score(model, general_f, contexts),
        }
        print(name, json.dumps(row), flush=True)
        rows.append(row)
    return {"household": name, "trained_parameters": trained, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the dev bundle (its Whisper is adapted)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--real-size-steps", type=int, default=0, help="time this many real-size steps")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10, 20])
    parser.add_argument("--lora-rank", type=int, default=0, help="0: the whole decoder trains")
    parser.add_argument("--encoder-layers", type=int, default=0, help="the encoder's top layers train too")
    parser.add_argument("--replay-n", type=int, default=100, help="base-household utterances trained on")
    parser.add_argument("--labelled", type=int, default=100)
    parser.add_argument(
        "--speed-perturb",
        type=lambda s: [float(x) for x in s.split(",")] if s else [],
        default=[],
        help="train on each corrected utterance at these speeds too (e.g. 0.9,1.1)",
    )
    parser.add_argument("--heldout", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="of the adapters' init and the batches' order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.real_size_steps:
        print(
            json.dumps(
                {"threads": torch.get_num_threads(), "lora_rank": args.lora_rank, **real_size_step_s(args)}
            )
        )
        return
    if args.model is None or args.work is None:
        parser.error("--model and --work are needed (or --real-size-steps)")
    base = [h for h in load_households() if h.split == "base"]
    replay = load_utterances(bootstrap_speech(args.work / "bootstrap", "replay", 400, REPLAY_SEED, base))
    general = load_utterances(bootstrap_speech(args.work / "bootstrap", "general", 60, GENERAL_SEED, base))
    unseen = [h.name for h in load_households() if h.split == "unseen"]
    results = [
        adapt_household(args, i, name, replay[: args.replay_n], general) for i, name in enumerate(unseen)
    ]
    what = f"LoRA rank {args.lora_rank}" if args.lora_rank else "whole decoder"
    what += f" and the encoder's top {args.encoder_layers} layer(s)" if args.encoder_layers else ""
    what += f", corrected utterances also at speeds {args.speed_perturb}" if args.speed_perturb else ""
    print(
        f"\nDate {date.today()}; machine: {platform.machine()} {torch.get_num_threads()} thread(s); "
        f"{what}, lr {args.lr}, {args.labelled} corrected + {args.replay_n} replayed utterances, "
        f"{args.heldout} held out, seed {args.seed}.\n"
    )
    print(
        "| household | trained parameters | epochs | train s | cascade on its 50 held-out | on 60 general |"
    )
    print("|---|---|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            h, g = row["household"], row["general"]
            figures = [result["household"], result["trained_parameters"], row["epochs"], row["train_s"]]
            figures.append(f"{h['intent_accuracy']:.2f} / {h['wer']:.3f}")
            figures.append(f"{g['intent_accuracy']:.3f} / {g['wer']:.3f}")
            print("| " + " | ".join(str(x) for x in figures) + " |")
    settings = {k: str(v) for k, v in vars(args).items()}
    out = {"date": str(date.today()), "args": settings, "results": results}
    (args.work / "decoder_adaptation.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
