"""Whisper decoder adapters: trained, stored in a version beside the projector, served and taken back.

All on the micro model's own Whisper, with its real cascade decoding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from wyoming_tinyalign.adapt import DECODER_PADDED_MB, DECODER_REPLAY, decoder_sizes
from wyoming_tinyalign.decoder_train import DecoderTrainConfig, decoder_examples, train_decoder_adapter
from wyoming_tinyalign.model.bundle import BundleError, load_decoder_adapter, load_projector, save_projector
from wyoming_tinyalign.model.decoder_adapter import AdapterConfig, AdapterError, adapter_parameters
from wyoming_tinyalign.model.speechllm import SpeechLLM
from wyoming_tinyalign.versions import Versions, load_household_model, record_model
from wyoming_tinyalign.worker import InferenceWorker, PcmSegment

PHRASE = "turn on the zebra lamp"


def _audio(seed: int) -> np.ndarray:
    """One second of noise, on the 16-bit grid (so that it reaches the worker as PCM unchanged)."""
    noise = np.random.default_rng(seed).standard_normal(16000) * 0.1
    return (np.round(noise * 32768) / 32768).astype(np.float32)


def _heard(model: SpeechLLM, audio: np.ndarray) -> str:
    return model.run(audio, "cascade", with_intent=False).transcript


@pytest.fixture(scope="module")
def trained(micro_model: Path) -> tuple[SpeechLLM, dict, str]:
    """The micro model with adapters trained to hear PHRASE in one noise clip; what it heard before."""
    model = SpeechLLM.load(micro_model)
    before = _heard(model, _audio(0))
    examples = decoder_examples(model, [PHRASE] * 8, [_audio(0)] * 8, ["en"] * 8)
    cfg = DecoderTrainConfig(epochs=30, batch=4, lr=2e-3, max_s=120)
    with model.separate_decoder():
        result = train_decoder_adapter(model, examples, cfg)
        assert _heard(model, _audio(0)) == PHRASE  # the second load learnt it ...
    assert _heard(model, _audio(0)) == before != PHRASE  # ... the model's own Whisper is as it was
    assert result.steps == 60 and result.epochs == 30 and result.loss_curve[-1] < result.loss_curve[0]
    # The learning rate decays along a cosine over the 60 steps, to almost nothing at the last.
    rates = result.lr_curve
    assert len(rates) == 30 and rates == sorted(rates, reverse=True)
    assert rates[0] == cfg.lr and 0.5 * cfg.lr < rates[14] < 0.6 * cfg.lr and rates[-1] < 0.001 * cfg.lr
    # The same night trains the same adapters (whatever the process drew before); another seed, others.
    torch.rand(7)
    for seed, same in ((cfg.seed, True), (cfg.seed + 1, False)):
        with model.separate_decoder():
            again = train_decoder_adapter(model, examples, replace(cfg, seed=seed)).adapter
        assert all(torch.equal(again[k], v) for k, v in result.adapter.items()) == same
    return model, result.adapter, before


def test_adapters_cut_short_by_the_clock_have_decayed_their_learning_rate(micro_model: Path) -> None:
    """A night whose time holds a few of the epochs asked for decays the rate over those it holds (at
    real size the adapters stop on the clock after about 4 of 20)."""
    model = SpeechLLM.load(micro_model)
    examples = decoder_examples(model, [PHRASE] * 8, [_audio(0)] * 8, ["en"] * 8)
    cfg = DecoderTrainConfig(epochs=10_000, batch=4, max_s=3.0)
    with model.separate_decoder():
        result = train_decoder_adapter(model, examples, cfg)
    assert 2 <= result.epochs < 10_000, result.epochs
    assert result.lr_curve[-1] < 0.5 * cfg.lr, result.lr_curve  # (constant over 10,000 epochs: 1.0)


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_distilled_replay_is_held_to_what_the_start_heard(micro_model: Path, distill: float) -> None:
    """A replayed clip (a tone) labelled with the household's phrase: learnt as labelled without
    distillation, not with it (held to what the adapters' start wrote on it); the household's clip is
    learnt either way."""
    model = SpeechLLM.load(micro_model)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    before = _heard(model, tone)
    assert before != PHRASE
    texts, audios = [PHRASE] * 8, [_audio(0)] * 4 + [tone] * 4
    examples = decoder_examples(model, texts, audios, ["en"] * 8, replayed=[False] * 4 + [True] * 4)
    cfg = DecoderTrainConfig(epochs=30, batch=4, lr=2e-3, max_s=120, distill=distill)
    with model.separate_decoder():
        train_decoder_adapter(model, examples, cfg)
        assert _heard(model, _audio(0)) == PHRASE
        heard = _heard(model, tone)
        assert heard != PHRASE if distill else heard == PHRASE, (before, heard)
    assert all(x.teacher is not None for x in examples[4:]) == bool(distill)


def test_a_failing_teacher_leaves_the_adapters_frozen(micro_model: Path) -> None:
    """The teacher runs inside the training's `try`: when it fails, the adapters' gradients are switched
    off again, as serving expects (an adapter that still asks for gradients would make every answer
    build a graph)."""
    model = SpeechLLM.load(micro_model)
    examples = decoder_examples(model, [PHRASE] * 2, [_audio(0)] * 2, ["en"] * 2, replayed=[False, True])
    examples[1].features = torch.zeros(examples[1].frames, 3)  # (not the decoder's width)
    with model.separate_decoder():
        with pytest.raises(RuntimeError):
            train_decoder_adapter(model, examples, DecoderTrainConfig(epochs=1, batch=2, distill=1.0))
        params = adapter_parameters(model.whisper)
        assert params and not any(p.requires_grad for p in params.values())
        assert not model.whisper.training


def test_a_transcript_longer_than_the_decoder_writes_is_left_out(micro_model: Path) -> None:
    model = SpeechLLM.load(micro_model)
    limit = model.whisper.config.max_target_positions
    long = " ".join([PHRASE] * limit)  # (a correction may hold 1000 characters)
    examples = decoder_examples(model, [PHRASE, long], [_audio(0), _audio(1)], ["en", "en"])
    assert [len(x.ids) < limit for x in examples] == [True]
    assert examples[0].frames == model.encode(_audio(0)).shape[0]
    with pytest.raises(ValueError, match="no transcripts"):
        train_decoder_adapter(model, [], DecoderTrainConfig())


def test_adapters_serve_and_come_off_again(trained: tuple[SpeechLLM, dict, str]) -> None:
    model, adapter, before = trained
    features = model.encode(_audio(1))
    model.set_decoder_adapter(adapter)
    assert _heard(model, _audio(0)) == PHRASE
    assert torch.equal(model.encode(_audio(1)), features)  # the encoder (the aligned path's) is untouched
    with model.separate_decoder():  # the night's second load of Whisper serves them too
        assert _heard(model, _audio(0)) == PHRASE
    model.set_decoder_adapter(None)
    assert _heard(model, _audio(0)) == before


def test_adapters_that_do_not_fit_are_refused_whole(trained: tuple[SpeechLLM, dict, str]) -> None:
    model, adapter, before = trained
    model.set_decoder_adapter(adapter)
    broken = dict(adapter)
    key = next(iter(broken))
    broken[key] = torch.zeros(3, 3)
    with pytest.raises(AdapterError, match="needs"):
        model.set_decoder_adapter(broken)
    with pytest.raises(AdapterError, match="do not fit"):
        model.set_decoder_adapter({k: v for k, v in adapter.items() if k != key})
    with pytest.raises(AdapterError, match="rank=16"):
        model.set_decoder_adapter(adapter, AdapterConfig(rank=8, alpha=16))
    assert _heard(model, _audio(0)) == PHRASE  # still serving what it served
    model.set_decoder_adapter(None)


def test_a_version_carries_adapters_beside_its_projector(
    trained: tuple[SpeechLLM, dict, str], micro_model: Path, tmp_path: Path
) -> None:
    model, adapter, before = trained
    info = replace(model.projector_info, decoder=AdapterConfig(), trained=True)
    plain = tmp_path / "plain.safetensors"
    save_projector(plain, model.projector, model.projector_info)
    assert load_decoder_adapter(plain) is None
    with pytest.raises(ValueError, match="shape"):
        save_projector(tmp_path / "x.safetensors", model.projector, model.projector_info, adapter)

    versions = Versions(tmp_path / "data")
    name = versions.add(model.projector, info, adapter)
    projector, got_info = versions.load(name)
    assert got_info.decoder == AdapterConfig()
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            projector.state_dict().values(), load_projector(plain)[0].state_dict().values(), strict=True
        )
    )
    served = versions.adapter(name)
    assert served is not None and all(torch.equal(served[0][k], adapter[k]) for k in adapter)

    # The served model of a data dir (what `eval --data-dir` reads) hears with them.
    versions.promote(name)
    record_model(tmp_path / "data", micro_model, "micro")
    household, current = load_household_model(tmp_path / "data")
    assert current == name and _heard(household, _audio(0)) == PHRASE

    # A torn file is refused with a clear error, as a torn projector is.
    torn = tmp_path / "torn.safetensors"
    data = versions.path(name).read_bytes()
    torn.write_bytes(data[: len(data) - 4096])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        load_decoder_adapter(torn)


async def test_the_worker_swaps_adapters_between_requests(
    trained: tuple[SpeechLLM, dict, str], micro_model: Path
) -> None:
    _, adapter, before = trained
    worker = InferenceWorker(SpeechLLM.load(micro_model), "cascade")
    try:
        segments = [_segment(_audio(0))]
        heard = await worker.transcribe(segments, "", "en")
        assert heard[1].transcript == before
        assert (
            await worker.swap_projector(
                worker.model.projector, worker.model.projector_info, (adapter, AdapterConfig())
            )
            == "cascade"
        )
        assert (await worker.transcribe(segments, "", "en"))[1].transcript == PHRASE
        broken = {k: v[:1] for k, v in adapter.items()}
        with pytest.raises(AdapterError):
            await worker.swap_projector(None, None, (broken, AdapterConfig()))
        assert worker.model.projector is not None  # the refused swap changed nothing
        assert (await worker.transcribe(segments, "", "en"))[1].transcript == PHRASE
        await worker.swap_projector(worker.model.projector, worker.model.projector_info, None)
        assert (await worker.transcribe(segments, "", "en"))[1].transcript == before
    finally:
        worker.close()


def _segment(audio: np.ndarray) -> PcmSegment:
    return PcmSegment(16000, 2, 1, np.round(audio * 32768).astype("<i2").tobytes())


def test_a_cascade_that_pads_to_30_s_trains_on_what_memory_and_time_allow(micro_model: Path) -> None:
    model = SpeechLLM.load(micro_model)
    assert decoder_sizes(model, 50, 60.0) == (50, 50 * DECODER_REPLAY)  # from the feature cache
    model.cascade_pad_30s = True  # each clip's features: 1500 frames of 64 (the micro Whisper)
    assert decoder_sizes(model, 50, 0.0) == (1, 1)  # no time to encode: the least there is
    household, replay = decoder_sizes(model, 50, 1e6)  # time enough: the memory allowance decides
    assert household == 50 and household + replay == DECODER_PADDED_MB * 2**20 // (1500 * 64 * 2)
