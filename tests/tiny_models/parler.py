"""Build a tiny random Parler-TTS (T5 description encoder, decoder with prompt embeddings,
EnCodec at 24 kHz) with a T5 tokenizer, and save it the way parler-tts-mini-v1 is laid out.

Run in the parler-tts environment: `python parler.py <output folder>`.
"""

from __future__ import annotations

import sys

import torch
from parler_tts import ParlerTTSConfig, ParlerTTSDecoderConfig, ParlerTTSForConditionalGeneration
from t5_vocab import t5_vocab
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import EncodecConfig, GenerationConfig, T5Config, T5TokenizerFast

CODEBOOK_SIZE = 64


def tokenizer() -> T5TokenizerFast:
    # transformers 4.46's T5Tokenizer needs a sentencepiece file; the fast one takes the same
    # Unigram vocabulary built in code.
    vocab = t5_vocab()
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def build(folder: str) -> None:
    torch.manual_seed(0)
    tok = tokenizer()
    text_encoder = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    audio_encoder = EncodecConfig(
        sampling_rate=24_000, upsampling_ratios=[8, 5, 4, 2], target_bandwidths=[3.0],
        codebook_size=CODEBOOK_SIZE, hidden_size=16, num_filters=4, num_lstm_layers=1,
    )
    decoder = ParlerTTSDecoderConfig(
        # The codebook's tokens plus end-of-stream (pad) and beginning-of-stream.
        vocab_size=CODEBOOK_SIZE + 2,
        pad_token_id=CODEBOOK_SIZE,
        eos_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE + 1,
        num_codebooks=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=512,
        # Weights as large as a trained model's, so that the description visibly changes the
        # output: at the default 0.02 every token is about equally likely.
        initializer_factor=1.0,
    )
    config = ParlerTTSConfig.from_sub_models_config(
        text_encoder, audio_encoder, decoder, vocab_size=len(tok)
    )
    model = ParlerTTSForConditionalGeneration(config).eval()
    with torch.no_grad():
        # EnCodec's codebooks start as zeros; random vectors make each token sound different.
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    # A random model never says "stop": a short limit keeps each clip under a second.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=CODEBOOK_SIZE + 1,
        pad_token_id=CODEBOOK_SIZE,
        eos_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE + 1,
        do_sample=True,
        max_length=60,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


if __name__ == "__main__":
    build(sys.argv[1])
