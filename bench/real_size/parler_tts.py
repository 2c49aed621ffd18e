"""Parler-TTS at parler-tts/parler-tts-mini-v1's sizes with random weights, laid out as
tests/tiny_models/parler.py lays out its tiny one, so the production backend loads it offline."""

from __future__ import annotations

import re
from pathlib import Path

SOURCE = (
    "parler-tts/parler-tts-mini-v1, as github.com/huggingface/parler-tts trained it (helpers/training_configs/"
    "starting_point_v1.json from helpers/model_init_scripts/init_model_600M.py): google/flan-t5-large "
    "encoder, decoder 24 layers, 1024 wide, 16 heads, ffn 4096, 9 codebooks; DAC 44.1 kHz 8 kbps"
)
FOLDER = "parler-tts-mini-v1"
CODEBOOK_SIZE = 1024  # DAC's
VOCAB_SIZE = CODEBOOK_SIZE + 64  # init_model_600M.py: "+ 64 instead of +1 to have a multiple of 64"

# google/flan-t5-large config.json (T5 v1.1 large; the encoder only is kept).
FLAN_T5_LARGE = {
    "vocab_size": 32_128, "d_model": 1024, "d_kv": 64, "d_ff": 2816, "num_layers": 24, "num_heads": 16,
    "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
}
# init_model_600M.py's ParlerTTSDecoderConfig; the DAC (parler-tts/dac_44khZ_8kbps) is DACConfig's
# defaults: 9 codebooks of 1024, 86 frames a second, 44.1 kHz.
DECODER = {
    "vocab_size": VOCAB_SIZE, "max_position_embeddings": 4096, "num_hidden_layers": 24, "ffn_dim": 4096,
    "num_attention_heads": 16, "hidden_size": 1024, "activation_function": "gelu", "num_codebooks": 9,
    "pad_token_id": CODEBOOK_SIZE, "eos_token_id": CODEBOOK_SIZE, "bos_token_id": CODEBOOK_SIZE + 1,
}


def tokenizer():
    """tests/tiny_models/parler.py's T5 tokenizer made in code (letters, digits, punctuation), plus one
    piece for each word of the texts this benchmark sends: flan-t5's own tokenizer makes about one token
    a word of them, letters alone about four, which would bill flan-t5-large's 24 layers for a description
    four times longer than the real model reads. (Built here: this image's site-packages has a `tests`
    package of its own, which hides the repository's.)"""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from bench.real_size.run import TEXT
    from functions.parler_tts import DEFAULT_DESCRIPTION

    chars = string.ascii_letters + string.digits + string.punctuation
    words = {word for word in re.findall(r"[A-Za-z']+", f"{TEXT} {DEFAULT_DESCRIPTION}") if len(word) > 1}
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(f"▁{c}", -1.0) for c in chars] + [(c, -1.0) for c in chars]
    # Each word also inside another ("low-pitched": "pitched").
    vocab += [(piece, -0.5) for word in sorted(words) for piece in (f"▁{word}", word)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def build(models_dir: Path) -> dict:
    config = {"name": "parler-tts-mini-v1", "backend": "parler-tts", "parameters": {"model": FOLDER}}
    out = Path(models_dir) / FOLDER
    if out.is_dir():
        return config

    import torch
    from parler_tts import ParlerTTSConfig, ParlerTTSDecoderConfig, ParlerTTSForConditionalGeneration
    from parler_tts.dac_wrapper import DACConfig
    from transformers import GenerationConfig, T5Config

    torch.manual_seed(0)
    model = ParlerTTSForConditionalGeneration(ParlerTTSConfig.from_sub_models_config(
        T5Config(**FLAN_T5_LARGE), DACConfig(), ParlerTTSDecoderConfig(**DECODER),
        vocab_size=FLAN_T5_LARGE["vocab_size"],
    )).eval()
    # init_model_600M.py's generation defaults: sampling, no guidance, 30 s at most.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=CODEBOOK_SIZE + 1, bos_token_id=CODEBOOK_SIZE + 1,
        pad_token_id=CODEBOOK_SIZE, eos_token_id=CODEBOOK_SIZE, do_sample=True, guidance_scale=1.0,
        max_length=30 * 86,
    )
    # Saved aside and renamed once whole, so that an interrupted build is not taken for a model.
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer().save_pretrained(partial)
    partial.rename(out)
    return config


def fix_length(backend, tokens: int) -> None:
    """`tokens` decoder steps, each one token in each of the 9 codebooks (86 steps a second of audio;
    the delay pattern spends the first 8). Random weights would stop at any step (the end token) or
    pick one of the 63 ids above the codebook that a trained model never does, and such a frame is
    dropped: both are suppressed, so every step is a frame."""
    generate = backend.model.generate
    suppressed = list(range(CODEBOOK_SIZE, VOCAB_SIZE))

    def fixed(*args, **kwargs):
        return generate(*args, **{**kwargs, "max_new_tokens": tokens, "suppress_tokens": suppressed})

    backend.model.generate = fixed


def parameters(backend) -> int:
    return sum(parameter.numel() for parameter in backend.model.parameters())

