"""The household's memory on Whisper's decoder: mixed into each step, built from transcripts, stored with
the night's adapters in a version and served with them. On the micro model's own Whisper."""

from __future__ import annotations

import resource
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from wyoming_tinyalign.decoder_train import decoder_examples, remember
from wyoming_tinyalign.model.decoder_adapter import AdapterConfig, AdapterError, fresh
from wyoming_tinyalign.model.decoder_memory import CLIPS, JUDGES, KEYS, WEIGHT, DecoderMemory, memory_clips
from wyoming_tinyalign.model.speechllm import SpeechLLM, whisper_transcript
from wyoming_tinyalign.train import FeatureCache
from wyoming_tinyalign.versions import Versions

PHRASE = "turn on the zebra lamp"
HAND_CLIPS = ["aa" * 32, "bb" * 32, "cc" * 32]  # clip keys (sha256 digests) for memories made by hand


def _audio(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(16000) * 0.1).astype(np.float32)


def _heard(model: SpeechLLM, audio: np.ndarray, memory: DecoderMemory | None) -> str:
    text, _ = whisper_transcript(model.whisper, model.whisper_tokenizer, model.encode(audio), memory=memory)
    return text


def test_a_remembered_token_wins_a_close_call_and_the_others_keep_their_share() -> None:
    hidden = torch.tensor([1.0, 0.0, 0.0])
    keys = torch.stack([hidden, torch.tensor([0.0, 5.0, 0.0])])
    memory = DecoderMemory(keys, torch.tensor([2, 0]), torch.tensor([0, 1]), HAND_CLIPS[:2])
    own = torch.log(torch.tensor([0.4, 0.1, 0.3, 0.2]))
    mixed = memory.mix(own, hidden).exp()
    assert int(mixed.argmax()) == 2 and float(mixed.sum()) == pytest.approx(1.0)
    # The far state weighs almost nothing; tokens no state remembers keep (1 - WEIGHT) of theirs.
    assert float(mixed[0]) == pytest.approx((1 - WEIGHT) * 0.4, abs=1e-6)
    assert float(mixed[3]) == pytest.approx((1 - WEIGHT) * 0.2)
    with pytest.raises(AdapterError, match="keys"):
        DecoderMemory(
            torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), HAND_CLIPS
        )
    with pytest.raises(AdapterError, match="clips"):
        DecoderMemory(keys, torch.tensor([2, 0]), torch.tensor([0, 2]), HAND_CLIPS[:2])


def test_a_memory_forgets_a_clips_states_and_keeps_the_others() -> None:
    memory = DecoderMemory(
        torch.arange(10.0).reshape(5, 2), torch.arange(5), torch.tensor([0, 0, 1, 2, 2]), HAND_CLIPS
    )
    assert memory.holds({HAND_CLIPS[1], "dd" * 32}) and not memory.holds({"dd" * 32})
    left = memory.without({HAND_CLIPS[0]})
    assert left is not None and left.clips == HAND_CLIPS[1:]
    assert left.values.tolist() == [2, 3, 4] and left.owners.tolist() == [0, 1, 1]
    assert torch.equal(left.keys, memory.keys[2:])
    assert memory.without(set(HAND_CLIPS)) is None
    stored = DecoderMemory.of(memory.tensors())  # (through the tensors a version file holds)
    assert stored is not None and stored.clips == HAND_CLIPS and torch.equal(stored.owners, memory.owners)


def test_a_memory_marks_the_clips_that_judge_nights_and_is_judged_without_them() -> None:
    """The held-out corrections are remembered, marked: a night judges the memory without them, a
    version's tensors keep the marks, and forgetting a clip forgets its mark."""
    memory = DecoderMemory(
        torch.arange(10.0).reshape(5, 2), torch.arange(5), torch.tensor([0, 0, 1, 2, 2]), HAND_CLIPS,
        frozenset({HAND_CLIPS[1]}),
    )  # fmt: skip
    judged = memory.judged()
    assert judged is not None and judged.clips == [HAND_CLIPS[0], HAND_CLIPS[2]] and not judged.judges
    assert judged.values.tolist() == [0, 1, 3, 4] and judged.weight == memory.weight
    stored = DecoderMemory.of(memory.tensors())
    assert stored is not None and stored.judges == {HAND_CLIPS[1]}
    assert memory.without({HAND_CLIPS[1]}).judges == frozenset()  # type: ignore[union-attr]
    assert memory.without({HAND_CLIPS[0]}).judges == {HAND_CLIPS[1]}  # type: ignore[union-attr]
    only_judges = replace(memory, judges=frozenset(HAND_CLIPS))
    assert only_judges.judged() is None and replace(memory, judges=frozenset()).judged() is not None
    # A version's memory from before the marks judges nothing; marks that do not fit are refused.
    old = {k: v for k, v in memory.tensors().items() if k != JUDGES}
    assert DecoderMemory.of(old).judges == frozenset()  # type: ignore[union-attr]
    with pytest.raises(AdapterError, match="judge"):
        DecoderMemory.of({**old, JUDGES: torch.ones(2, dtype=torch.uint8)})
    with pytest.raises(AdapterError, match="judging"):
        replace(memory, judges=frozenset({"dd" * 32}))


def test_a_memory_of_a_clips_transcript_writes_it_at_full_weight(micro_model: Path) -> None:
    """Its states are the ones decoding the clip meets, step for step (no position off by one)."""
    model = SpeechLLM.load(micro_model)
    before = _heard(model, _audio(0), None)
    memory = remember(model.whisper, decoder_examples(model, [PHRASE], [_audio(0)], ["en"]))
    n_tokens = len(model.whisper_tokenizer(PHRASE, add_special_tokens=False)["input_ids"])
    assert len(memory.values) == n_tokens + 1  # and the end token
    assert memory.clips == [FeatureCache.key(_audio(0))] and set(memory.owners.tolist()) == {0}
    assert before != PHRASE and _heard(model, _audio(0), replace(memory, weight=1.0)) == PHRASE


def test_a_version_carries_the_memory_with_its_adapters(
    micro_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = SpeechLLM.load(micro_model)
    memory = remember(
        model.whisper, decoder_examples(model, [PHRASE] * 2, [_audio(0), _audio(1)], ["en"] * 2)
    )
    adapter = (
        fresh(model.whisper, AdapterConfig(), seed=0) | memory.tensors()
    )  # (B zero: the decoder as built)
    info = replace(model.projector_info, decoder=AdapterConfig(), trained=True)
    versions = Versions(tmp_path / "data")
    name = versions.add(model.projector, info, adapter)
    stored = versions.adapter(name)
    assert stored is not None
    model.set_decoder_adapter(*stored)
    served = model.decoder_memory
    assert served is not None and torch.equal(served.values, memory.values)
    assert torch.allclose(served.keys.float(), memory.keys, rtol=1e-3, atol=1e-3)  # (kept in half precision)
    # A memory of states another decoder's width is refused whole: the served one stays.
    wide = {**stored[0], KEYS: torch.zeros(len(memory.values), memory.keys.shape[1] + 1)}
    with pytest.raises(AdapterError, match="wide"):
        model.set_decoder_adapter(wide, stored[1])
    assert model.decoder_memory is served
    # Which clips a version remembers is read from their keys alone.
    clips = versions.adapter(name, only={CLIPS})
    assert clips is not None and set(clips[0]) == {CLIPS} and memory_clips(clips[0]) == memory.clips
    # A deleted recording's states go from the version's file (the others stay), then the memory. On a
    # full disk (no file past half its size) the file stays whole and the log says it remembers still.
    assert versions.forget_memory({"dd" * 32}) == []
    whole = versions.path(name).read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(whole) // 2, hard))  # (EFBIG: Python ignores SIGXFSZ)
    try:
        assert versions.forget_memory({memory.clips[0]}) == []
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert f"version {name} still remembers recordings it should forget" in caplog.text
    assert versions.path(name).read_bytes() == whole and not list(versions.folder.glob(".*.tmp"))
    assert versions.forget_memory({memory.clips[0]}) == [name]
    left = DecoderMemory.of(versions.adapter(name)[0])
    assert left is not None and left.clips == memory.clips[1:] and len(left.values) == len(memory.values) // 2
    assert versions.forget_memory(set(memory.clips)) == [name]
    stored = versions.adapter(name)
    assert stored is not None and DecoderMemory.of(stored[0]) is None  # the adapters stay
    assert versions.load(name)[1].decoder == AdapterConfig()
    model.set_decoder_adapter(None)
    assert model.decoder_memory is None
