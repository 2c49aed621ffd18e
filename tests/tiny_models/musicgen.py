"""Build a tiny random MusicGen (T5 text encoder, EnCodec at 32 kHz, 4 codebooks, like
facebook/musicgen-small but a few thousand times smaller) and save it with its processor.

Run in the transformers-musicgen environment: `python musicgen.py <output folder>`.
"""

from __future__ import annotations

import sys

import torch
from t5_vocab import t5_vocab
from transformers import (
    EncodecConfig,
    EncodecFeatureExtractor,
    GenerationConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    T5Config,
    T5Tokenizer,
)

CODEBOOK_SIZE = 64


def build(folder: str) -> None:
    torch.manual_seed(0)
    tokenizer = T5Tokenizer(vocab=t5_vocab(), extra_ids=0)
    text_encoder = T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    # musicgen-small's codec shape: 32 kHz, hop 640 (50 frames a second), 4 codebooks.
    audio_encoder = EncodecConfig(
        sampling_rate=32000,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        codebook_size=CODEBOOK_SIZE,
        hidden_size=16,
        num_filters=4,
        num_lstm_layers=1,
        normalize=False,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=CODEBOOK_SIZE,
        num_codebooks=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=2048,
        pad_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE,
        # Weights as large as a trained model's, so that the prompt visibly changes the output
        # (at the default 0.02 every token is about equally likely, whatever the prompt).
        initializer_factor=1.0,
    )
    config = MusicgenConfig(text_encoder=text_encoder, audio_encoder=audio_encoder, decoder=decoder)
    model = MusicgenForConditionalGeneration(config).eval()
    # EnCodec's codebooks start as zeros (a trained model fills them): random vectors make each
    # token decode to a different sound.
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    # musicgen-small's own generation defaults.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=CODEBOOK_SIZE,
        pad_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE,
        do_sample=True,
        guidance_scale=3.0,
        max_length=1500,
    )
    model.save_pretrained(folder)
    processor = MusicgenProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=32000),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)


if __name__ == "__main__":
    build(sys.argv[1])
