"""The variable-length Whisper encoder and the three projector designs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from wyoming_tinyalign.model.encoder import AudioEncoder
from wyoming_tinyalign.model.projector import KINDS, ProjectorConfig, adaptive_pool, build_projector


@pytest.fixture(scope="module")
def whisper() -> WhisperModel:
    torch.manual_seed(0)
    cfg = WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=3,
    )  # fmt: skip
    return WhisperModel(cfg).eval()


@pytest.fixture(scope="module")
def encoder(whisper: WhisperModel) -> AudioEncoder:
    return AudioEncoder(whisper.get_encoder(), WhisperFeatureExtractor(feature_size=80)).eval()


def clips(seconds: tuple[float, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in seconds]


def test_encoder_equals_hf_on_30_seconds(whisper: WhisperModel, encoder: AudioEncoder) -> None:
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        ref = whisper.get_encoder()(mel).last_hidden_state
        ours, lengths = encoder(mel, torch.tensor([3000, 3000]))
    assert lengths.tolist() == [1500, 1500]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_encoder_runs_on_true_length(encoder: AudioEncoder) -> None:
    feats, lengths = encoder.encode(clips((3.0,)))
    assert feats.shape == (1, 150, 64)  # 3 s at 50 frames/s, not 1500
    assert lengths.tolist() == [150]


def test_encoder_batch_equals_each_item_alone(encoder: AudioEncoder) -> None:
    audios = clips((0.5, 1.7, 3.0))
    batch, lengths = encoder.encode(audios)
    assert lengths.tolist() == [25, 85, 150]
    for i, audio in enumerate(audios):
        alone, n = encoder.encode([audio])
        torch.testing.assert_close(batch[i, : int(n[0])], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_projector_shapes_masks_and_norm(encoder: AudioEncoder, kind: str) -> None:
    torch.manual_seed(0)
    cfg = ProjectorConfig(
        kind=kind, input_dim=64, output_dim=32, embed_norm=0.5, hidden_dim=32, heads=2, stack=4
    )
    projector = build_projector(cfg).eval()
    feats, lengths = encoder.encode(clips((0.5, 1.7, 3.0)))
    with torch.no_grad():
        out, out_lengths = projector(feats, lengths)
        if kind == "bridgeformer":
            assert out.shape == (3, cfg.cast_len, 32)
            assert out_lengths.tolist() == [cfg.cast_len] * 3
        else:
            assert out.shape == (3, 38, 32)  # ceil(150 / 4)
            assert out_lengths.tolist() == [7, 22, 38]
        for i in range(3):
            alone, n = projector(feats[i : i + 1, : int(lengths[i])], lengths[i : i + 1])
            torch.testing.assert_close(
                out[i, : int(out_lengths[i])], alone[0, : int(n[0])], atol=1e-5, rtol=1e-4
            )
        # Changing what lies in the padding changes nothing.
        noisy = feats.clone()
        noisy[0, int(lengths[0]) :] = 100.0
        torch.testing.assert_close(projector(noisy, lengths)[0][0], out[0], atol=1e-5, rtol=1e-4)
    # Outputs sit at the LLM embedding rows' norm.
    assert out.norm(dim=-1).mean().item() == pytest.approx(0.5, rel=0.05)


def test_adaptive_pool_averages_valid_frames_only() -> None:
    x = torch.arange(8.0).reshape(1, 8, 1).repeat(2, 1, 1)
    pooled = adaptive_pool(x, torch.tensor([8, 4]), 4)
    assert pooled[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert pooled[1, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    # Shorter than the cast length: frames repeat, nothing past the length is read.
    short = adaptive_pool(x, torch.tensor([2, 2]), 4)
    assert short[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
