"""Real-size shapes for speed and memory benchmarks: the compute is real even when the words are not."""

from __future__ import annotations

from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from wyoming_tinyalign.model.prompt import DEFAULT_TEMPLATE, PromptTemplate
from wyoming_tinyalign.model.speechllm import SpeechLLM


def whisper_base() -> WhisperForConditionalGeneration:
    """openai/whisper-base's shapes, random weights."""
    return WhisperForConditionalGeneration(
        WhisperConfig(
            d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
            decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=51865,
            num_mel_bins=80,
        )
    )  # fmt: skip


def qwen25_05b(pad_token_id: int, eos_token_id: int) -> Qwen2ForCausalLM:
    """Qwen/Qwen2.5-0.5B's shapes, random weights (a smaller tokenizer's ids fit its vocabulary)."""
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
            pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        )
    )  # fmt: skip


def speech_llm(dev: SpeechLLM) -> SpeechLLM:
    """A SpeechLLM of whisper-base and Qwen2.5-0.5B shapes with random weights, speaking through the
    dev model's tokenizers (their ids fit the big vocabularies; the compute is what counts)."""
    return SpeechLLM(
        whisper=whisper_base(),
        whisper_tokenizer=dev.whisper_tokenizer,
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
        llm=qwen25_05b(dev.tokenizer.pad_token_id, dev.tokenizer.eos_token_id),
        tokenizer=dev.tokenizer,
        template=PromptTemplate(DEFAULT_TEMPLATE),
    )
