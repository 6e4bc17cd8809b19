"""Alignment training on the micro dev model: both objectives learn, the feature cache, resume, LoRA."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.manifest import load_utterances
from wyoming_tinyalign.model.bundle import load_bundle_config
from wyoming_tinyalign.model.prompt import answer_ids
from wyoming_tinyalign.model.speechllm import SpeechLLM
from wyoming_tinyalign.synth import render_corpus
from wyoming_tinyalign.train import (
    STATE_FILE,
    Example,
    FeatureCache,
    Progress,
    TrainConfig,
    embedlink_loss,
    fitting_horizon,
    generative_loss,
    lr_factor,
    made_progress,
    micro_batches,
    objective_loss,
    setup_projector,
    train,
    train_step,
    utterance_seconds,
    val_loss,
)

# A handful of steps at a constant rate (the decay has its own test).
FAST = dict(hidden_dim=32, heads=2, layers=1, batch=4, lr=3e-3, warmup=1, lr_floor=1.0, patience=100)


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    households = [h for h in load_households() if h.split == "base"]
    return render_corpus(tmp_path_factory.mktemp("tiny"), households, 8, seed=3)


@pytest.mark.parametrize(
    ("objective", "lora_r"), [("embedlink", 0), ("generative", 0), ("generative", 4), ("combined", 0)]
)
def test_each_objective_lowers_the_loss(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path, objective: str, lora_r: int
) -> None:
    cfg = TrainConfig(objective=objective, lora_r=lora_r, max_epochs=6, **FAST)
    result = train(
        micro_model, tiny_manifest, tiny_manifest, tmp_path / "out", cfg, cache_dir=tmp_path / "cache"
    )
    losses = [h["val_loss"] for h in result.history]
    assert result.steps == 12
    assert losses[-1] < 0.9 * losses[0], losses
    # The result is a bundle that loads as it is, with a trained projector (and the LoRA adapters).
    model = SpeechLLM.load(tmp_path / "out")
    assert model.has_aligned_projector
    # The best validation (intent accuracy first, then loss) is the one kept.
    assert model.projector_info.metrics == result.best
    key = (result.best["intent_accuracy"], -result.best["val_loss"])
    assert key == max((h["intent_accuracy"], -h["val_loss"]) for h in result.history)
    assert (load_bundle_config(tmp_path / "out").lora == "lora") == bool(lora_r)


def test_loss_only_validation_and_loss_curve(micro_model: Path, tiny_manifest: Path, tmp_path: Path) -> None:
    """`val_answers=False` (the nightly job's choice) validates without generating; the curve is kept."""
    model = SpeechLLM.load(micro_model)
    calls = {"generate": 0}
    generate = model.generate

    def counted(*args, **kwargs):
        calls["generate"] += 1
        return generate(*args, **kwargs)

    model.generate = counted  # type: ignore[method-assign]
    cfg = TrainConfig(max_epochs=3, val_answers=False, **FAST)
    result = train(
        micro_model, tiny_manifest, tiny_manifest, tmp_path / "o", cfg, cache_dir=tmp_path / "c", model=model
    )
    assert calls["generate"] == 0
    assert [set(h) & {"val_loss", "intent_accuracy"} for h in result.history] == [{"val_loss"}] * 3
    seconds = [s for s, _ in result.loss_curve]
    assert len(result.loss_curve) >= 2 and seconds == sorted(seconds)
    assert all(loss > 0 for _, loss in result.loss_curve)


def test_the_learning_rate_warms_up_then_decays_to_its_floor_by_the_end(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    assert [lr_factor(s, 4, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(10, 4, 0.5, floor=0.1) == pytest.approx(0.55)
    assert lr_factor(10, 4, 1.0, floor=0.1) == lr_factor(10, 4, 3.0, floor=0.1) == pytest.approx(0.1)
    # The horizon (both the projector's and the decoder adapters') holds while the time left holds the
    # epochs to it; else it is cut to the epochs that fit, one at least.
    assert fitting_horizon(400, 100, 10, left_s=60.0, epoch_s=2.0) == 400
    assert fitting_horizon(400, 100, 10, left_s=7.0, epoch_s=2.0) == 130
    assert fitting_horizon(400, 100, 10, left_s=-1.0, epoch_s=2.0) == 110
    # An epoch budget, no time limit: 4 epochs, and the rate falls at each validation, close to the floor.
    cfg = TrainConfig(max_minutes=None, max_epochs=4, val_answers=False, **{**FAST, "lr_floor": 0.2})
    result = train(micro_model, tiny_manifest, tiny_manifest, tmp_path / "o", cfg, cache_dir=tmp_path / "c")
    rates = [h["lr"] / cfg.lr for h in result.history]
    assert len(rates) == 4 and rates == sorted(rates, reverse=True) and rates[0] < 1.0
    assert 0.2 <= rates[-1] < 0.25
    with pytest.raises(ValueError, match="needs a budget"):
        train(
            micro_model, tiny_manifest, tiny_manifest, tmp_path / "none",
            TrainConfig(max_minutes=None, max_epochs=None, **FAST), cache_dir=tmp_path / "c",
        )  # fmt: skip


def test_the_time_budget_counts_the_runs_set_up(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoder features for a large log take time before the first step (47 s of a real-size night with
    700 logged utterances, which then ran 9.5 s over its 10 minutes): the budget counts them. Here the
    features take 3 s (a slow encoder) of a 4.5 s budget; not counted, the run would take 7.5 s or more."""
    features = FeatureCache.features

    def slow(cache: FeatureCache, audios: list) -> list:
        time.sleep(1.5)  # twice: the training and the validation set
        return features(cache, audios)

    monkeypatch.setattr(FeatureCache, "features", slow)
    cfg = TrainConfig(max_minutes=0.075, max_epochs=None, val_answers=False, **FAST)
    result = train(micro_model, tiny_manifest, tiny_manifest, tmp_path / "o", cfg, cache_dir=tmp_path / "c")
    assert result.steps >= 1 and result.seconds < 6.0, result.seconds
    assert result.history[-1]["elapsed_s"] >= 3.0  # from the start of the run, set-up included


def test_early_stopping_counts_validations_without_any_progress(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """Patience runs out when neither the kept checkpoint nor the validation loss improves."""
    frozen = TrainConfig(max_epochs=10, **{**FAST, "lr": 0.0, "patience": 2})
    result = train(
        micro_model, tiny_manifest, tiny_manifest, tmp_path / "a", frozen, cache_dir=tmp_path / "c"
    )
    assert len(result.history) == 3  # the first validation, then two without progress
    learning = TrainConfig(max_epochs=4, val_answers=False, **{**FAST, "patience": 1})
    result = train(
        micro_model, tiny_manifest, tiny_manifest, tmp_path / "b", learning, cache_dir=tmp_path / "c"
    )
    losses = [h["val_loss"] for h in result.history]
    assert losses == sorted(losses, reverse=True) and len(losses) == 4  # a falling loss keeps it going
    # A lower loss resets patience even when intent accuracy peaked earlier; nothing better does not.
    best = {"intent_accuracy": 0.2, "val_loss": 0.6}
    assert made_progress({"intent_accuracy": 0.1, "val_loss": 0.5}, best, min_val_loss=0.55)
    assert not made_progress({"intent_accuracy": 0.1, "val_loss": 0.56}, best, min_val_loss=0.55)


def _projected(
    micro_model: Path, manifest: Path
) -> tuple[SpeechLLM, list[Example], tuple[torch.Tensor, torch.Tensor]]:
    """The micro model with a new projector, the manifest's examples, and the projector's outputs."""
    model = SpeechLLM.load(micro_model)
    setup_projector(model, TrainConfig(**FAST))
    contexts = {h.name: context_text(h) for h in load_households()}
    loaded = load_utterances(manifest)
    feats, lengths = model.encoder.encode([a for _, a in loaded])
    examples = [
        Example(f[: int(n)], u, contexts[u.household])
        for (u, _), f, n in zip(loaded, feats, lengths, strict=True)
    ]
    return model, examples, model.projector(feats, lengths)


def test_the_generative_loss_from_cached_prefixes_equals_the_whole_prompt(
    micro_model: Path, tiny_manifest: Path
) -> None:
    """The frozen LLM runs from the audio slot on, after each household's cached prompt prefix: the loss
    and the projector's gradient are those of the whole prompt in one batch."""
    model, examples, (out, out_lengths) = _projected(micro_model, tiny_manifest)
    assert len({e.context for e in examples}) > 1  # one LLM call per household
    out = out.detach().requires_grad_(True)

    model.prefix_cache.cache_clear()
    loss = generative_loss(model, out, out_lengths, examples)
    (grad,) = torch.autograd.grad(loss, out)
    assert model.prefix_cache.cache_info().currsize == len({e.context for e in examples})

    rows, labels = [], []
    for i, e in enumerate(examples):
        prompt, _ = model.prompt_embeds(out[i, : int(out_lengths[i])], e.context)
        answer = answer_ids(model.tokenizer, e.utterance.text, e.utterance.intent)
        rows.append(torch.cat([prompt[0], model.embed_tokens(answer)]))
        labels.append(torch.tensor([-100] * prompt.shape[1] + answer))
    embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    label_t = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True
    )
    whole = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=label_t).loss
    (whole_grad,) = torch.autograd.grad(whole, out)
    torch.testing.assert_close(loss, whole)
    torch.testing.assert_close(grad, whole_grad)


def test_a_label_without_an_intent_teaches_the_words_alone(micro_model: Path, tiny_manifest: Path) -> None:
    """The night's teacher gives the transcript, not the intent: the generative loss teaches the transcript
    line and nothing after it, whatever the intent field holds, and not "not a command"."""
    model, examples, (out, out_lengths) = _projected(micro_model, tiny_manifest)
    first = examples[0]
    assert first.utterance.intent is not None

    def loss(**label: object) -> torch.Tensor:
        example = Example(first.features, replace(first.utterance, **label), first.context)
        return generative_loss(model, out[:1].detach(), out_lengths[:1], [example])

    words = loss(transcript_only=True)
    torch.testing.assert_close(words, loss(transcript_only=True, intent=None))
    assert not torch.allclose(words, loss(intent=None))  # "not a command" would be taught
    assert not torch.allclose(words, loss())
    full = answer_ids(model.tokenizer, first.utterance.text, first.utterance.intent)
    line = answer_ids(model.tokenizer, first.utterance.text, None, transcript_only=True)
    assert full[: len(line)] == line and model.tokenizer.decode(line).endswith("\n")
    assert model.tokenizer.eos_token_id not in line


@pytest.mark.parametrize("objective", ["generative", "embedlink"])
def test_micro_batches_bound_the_memory_not_the_step(
    micro_model: Path, tiny_manifest: Path, objective: str
) -> None:
    """A batch taken a few utterances at a time makes the whole batch's update: exactly (up to float
    sums) for the generative loss, a mean over answer tokens as the micro-batches are weighed; nearly
    for EmbedLink, a mean over output positions (the same number for every utterance here)."""
    model, examples, _ = _projected(micro_model, tiny_manifest)
    start = copy.deepcopy(model.projector).eval()  # no dropout: every run sees the same outputs

    def step(micro_batch: int | None) -> tuple[float, torch.Tensor]:
        projector = copy.deepcopy(start)
        params = list(projector.parameters())
        opt = torch.optim.SGD(params, lr=1.0)
        loss = train_step(model, projector, opt, params, objective_loss(objective), examples, micro_batch)
        return loss, torch.cat(
            [(a - b).detach().flatten() for a, b in zip(start.parameters(), params, strict=True)]
        )

    # Household by household, however the batch is shuffled: a run spans two households only where one
    # household's utterances end.
    households: dict[str, list[Example]] = {}
    for e in examples:
        households.setdefault(e.context, []).append(e)
    shuffled = [e for row in itertools.zip_longest(*households.values()) for e in row if e is not None]
    runs = [run for run, _ in micro_batches(model, shuffled, 2)]
    assert sorted(map(id, sum(runs, []))) == sorted(map(id, examples))
    assert sum(len({e.context for e in run}) > 1 for run in runs) < len(households)

    whole_loss, whole = step(None)
    assert whole.abs().sum() > 0
    zero_loss, zero = step(0)  # 0, as `--micro-batch 0`: the whole batch at once
    assert zero_loss == whole_loss and torch.equal(zero, whole)
    with pytest.raises(ValueError, match="at least 1 utterance"):
        step(-2)
    if objective == "generative":  # the validation loss does not depend on how many go through at once
        values = [val_loss(model, start, examples, generative_loss, size) for size in (8, 3, 1)]
        assert values == pytest.approx([values[0]] * 3, abs=2e-5)
    for micro_batch in (2, 1):
        loss, update = step(micro_batch)
        cosine = float(torch.nn.functional.cosine_similarity(update, whole, dim=0))
        if objective == "generative":
            assert loss == pytest.approx(whole_loss, rel=1e-3) and cosine > 0.9999
        else:
            assert loss == pytest.approx(whole_loss, rel=0.03) and cosine > 0.99


def test_the_combined_objective_weighs_its_embedlink_term(micro_model: Path, tiny_manifest: Path) -> None:
    model, examples, (out, out_lengths) = _projected(micro_model, tiny_manifest)
    gen, link = (loss(model, out, out_lengths, examples) for loss in (generative_loss, embedlink_loss))
    assert link > 0.1 * gen  # so that a weight left out would show
    for weight in (0.0, 0.25, 1.0):
        combined = objective_loss("combined", weight)(model, out, out_lengths, examples)
        torch.testing.assert_close(combined, gen + weight * link)
    assert objective_loss("embedlink") is embedlink_loss and objective_loss("generative") is generative_loss


def test_timing_an_utterances_step_changes_nothing(micro_model: Path, tiny_manifest: Path) -> None:
    """The night times what a training step costs an utterance on the served projector before it
    decides whether to train it (`adapt.projector_skip`): forward and backward through the LLM, and
    the projector as it was, without gradients, in eval mode as the answers need it."""
    model, examples, _ = _projected(micro_model, tiny_manifest)
    projector = model.projector.eval()
    start = copy.deepcopy(projector.state_dict())
    for objective in ("embedlink", "combined"):
        assert utterance_seconds(model, projector, objective_loss(objective, 0.1), examples[:3]) > 0
    assert all(torch.equal(start[k], v) for k, v in projector.state_dict().items())
    assert all(p.grad is None for p in projector.parameters()) and not projector.training


def test_lora_adapters_round_trip(micro_model: Path, tiny_manifest: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(objective="generative", lora_r=4, max_epochs=2, **FAST)
    trained = SpeechLLM.load(micro_model)
    train(
        micro_model,
        tiny_manifest,
        tiny_manifest,
        tmp_path / "out",
        cfg,
        cache_dir=tmp_path / "cache",
        model=trained,
    )
    assert (tmp_path / "out" / "lora" / "adapter_model.safetensors").is_file()
    # Validation answered from prompt prefixes cached after the last step, not before the adapters learned.
    trained.llm.eval()
    context = context_text(next(h for h in load_households() if h.split == "base"))
    token = trained.embed_tokens(trained.text_ids("on")).unsqueeze(0)
    validated = trained.llm(inputs_embeds=token, cache=copy.deepcopy(trained.prefix_cache(context))).logits
    fresh = trained.llm(inputs_embeds=token, cache=trained._prefix_cache(context)).logits
    torch.testing.assert_close(validated, fresh)
    base, adapted = SpeechLLM.load(micro_model), SpeechLLM.load(tmp_path / "out")
    # The adapters changed the LLM's attention weights (merged at load), and only those.
    name = "model.layers.0.self_attn.q_proj.weight"
    before, after = base.llm.state_dict(), adapted.llm.state_dict()
    assert not torch.equal(before[name], after[name])
    torch.testing.assert_close(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )


def test_features_are_cached_across_epochs_and_runs(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(objective="embedlink", max_epochs=3, **FAST)
    first = train(
        micro_model, tiny_manifest, tiny_manifest, tmp_path / "a", cfg, cache_dir=tmp_path / "cache"
    )
    # 8 training clips in batches of 4; the validation manifest is the same audio: all hits.
    assert first.encoder_calls == 2
    assert len(first.history) == 3
    again = train(
        micro_model, tiny_manifest, tiny_manifest, tmp_path / "b", cfg, cache_dir=tmp_path / "cache"
    )
    assert again.encoder_calls == 0


def test_cached_features_are_what_a_fresh_encoding_gives(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """A clip's features are half precision, as stored: the first night (computed) and later nights
    (read back) train on the same numbers."""
    model = SpeechLLM.load(micro_model)
    audios = [a for _, a in load_utterances(tiny_manifest)][:3]
    cache = FeatureCache(tmp_path, model.encoder)
    fresh = cache.features(audios)
    again = FeatureCache(tmp_path, model.encoder)
    stored = again.features(audios)
    assert (cache.encoder_calls, again.encoder_calls) == (1, 0)
    assert all(f.dtype == torch.float16 and torch.equal(f, g) for f, g in zip(fresh, stored, strict=True))
    feats, lengths = model.encoder.encode(audios)
    for f, full, n in zip(fresh, feats, lengths, strict=True):
        torch.testing.assert_close(f.float(), full[: int(n)], rtol=1e-3, atol=1e-3)


def test_a_fine_tune_that_only_hurts_keeps_the_starting_projector(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """With an initial projector, step 0 is validated too: a learning rate of 50 never beats it."""
    init = micro_model / "projector.safetensors"
    cfg = TrainConfig(max_epochs=3, val_answers=False, **{**FAST, "lr": 50.0})
    result = train(
        micro_model,
        tiny_manifest,
        tiny_manifest,
        tmp_path / "o",
        cfg,
        cache_dir=tmp_path / "c",
        init_projector=init,
    )
    assert [h["step"] for h in result.history] == [0, 2, 4, 6]
    assert result.best["step"] == 0 and result.best["train_loss"] is None
    assert min(h["val_loss"] for h in result.history[1:]) > result.best["val_loss"]
    with safe_open(str(init), "pt") as a, safe_open(str(tmp_path / "o" / "projector.safetensors"), "pt") as b:
        names = list(a.keys())
        assert names and set(names) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names)


def test_a_resumed_runs_eta_is_from_its_own_pace(caplog: pytest.LogCaptureFixture) -> None:
    """A run that goes on at step 50 of 100 and does 10 steps in 1 s has 4 s left, not 0.7 s."""
    caplog.set_level(logging.INFO, logger="wyoming_tinyalign.train")
    progress = Progress("whisper", 100, every_s=0.0, before=50)
    time.sleep(1.0)
    progress.update(60, 0.5)
    (eta,) = re.findall(r"whisper 60/100 loss 0.5000 eta (\d+)s", caplog.text)
    assert 4 <= int(eta) <= 6


def test_training_resumes_from_the_saved_step(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    train(micro_model, tiny_manifest, tiny_manifest, out, TrainConfig(max_epochs=2, **FAST), cache_dir=cache)
    with safe_open(str(out / STATE_FILE), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
    assert (state["epoch"], state["step"]) == (2, 4)
    # "Interrupted" after epoch 2: a new run with a larger epoch budget carries on from there.
    caplog.set_level(logging.INFO, logger="wyoming_tinyalign.train")
    result = train(
        micro_model, tiny_manifest, tiny_manifest, out, TrainConfig(max_epochs=3, **FAST), cache_dir=cache
    )
    assert "resuming from epoch 2, step 4" in caplog.text
    assert result.steps == 6
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[:2] == state["history"]
    # The same folder with another starting projector is another run: it starts afresh.
    init = tmp_path / "init.safetensors"
    shutil.copy(out / "projector.safetensors", init)
    caplog.clear()
    result = train(
        micro_model, tiny_manifest, tiny_manifest, out, TrainConfig(max_epochs=4, **FAST),
        cache_dir=cache, init_projector=init,
    )  # fmt: skip
    assert "starting afresh" in caplog.text and "resuming" not in caplog.text
    assert result.history[0]["step"] == 0 and result.steps == 8  # the starting projector validated first


def test_missing_and_unreadable_audio_are_named_and_skipped(
    micro_model: Path, tiny_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_manifest.parent, data)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    gone, broken = json.loads(lines[0])["audio"], json.loads(lines[1])["audio"]
    (data / gone).unlink()
    (data / broken).write_bytes(b"RIFF0000WAVEjunk")
    cfg = TrainConfig(max_epochs=1, **FAST)
    result = train(
        micro_model,
        data / "manifest.jsonl",
        data / "manifest.jsonl",
        tmp_path / "o",
        cfg,
        cache_dir=tmp_path / "c",
    )
    assert result.history[0]["step"] == 1  # 6 readable clips, batches of 4
    assert gone in caplog.text and broken in caplog.text
