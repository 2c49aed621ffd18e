"""MusicGen at facebook/musicgen-small's sizes with random weights, laid out as
tests/tiny_models/musicgen.py lays out its tiny one, so the production backend loads it offline."""

from __future__ import annotations

from pathlib import Path

SOURCE = (
    "facebook/musicgen-small config.json: decoder 24 layers, 1024 wide, 16 heads, ffn 4096, 4 codebooks of "
    "2048 (transformers' convert_musicgen_transformers.py, 'small'); text encoder t5-base; EnCodec 32 kHz "
    "(convert_encodec_checkpoint_to_pytorch.py, 'encodec_32khz')"
)
FOLDER = "facebook-musicgen-small"
CODEBOOK_SIZE = 2048

# t5-base's config.json (the encoder only is kept).
T5_BASE = {
    "vocab_size": 32_128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12,
    "feed_forward_proj": "relu", "relative_attention_num_buckets": 32,
}
# facebook/encodec_32khz: EncodecConfig's defaults (encodec_24khz) changed as the conversion script does.
ENCODEC_32K = {
    "sampling_rate": 32_000, "upsampling_ratios": [8, 5, 4, 4], "target_bandwidths": [2.2], "num_filters": 64,
    "codebook_size": CODEBOOK_SIZE, "use_causal_conv": False, "normalize": False, "use_conv_shortcut": False,
}
# The conversion script's "small": hidden 1024, ffn 4 x 1024, 24 layers; heads, codebooks and
# vocabulary are MusicgenDecoderConfig's defaults, written out.
DECODER = {
    "vocab_size": CODEBOOK_SIZE, "max_position_embeddings": 2048, "num_hidden_layers": 24, "ffn_dim": 4096,
    "num_attention_heads": 16, "hidden_size": 1024, "num_codebooks": 4, "tie_word_embeddings": False,
    "pad_token_id": CODEBOOK_SIZE, "bos_token_id": CODEBOOK_SIZE,
}


def build(models_dir: Path) -> dict:
    config = {"name": "musicgen-small", "backend": "transformers-musicgen", "parameters": {"model": FOLDER}}
    out = Path(models_dir) / FOLDER
    if out.is_dir():
        return config

    import torch
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

    from tests.tiny_models.t5_vocab import t5_vocab

    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(MusicgenConfig(
        text_encoder=T5Config(**T5_BASE), audio_encoder=EncodecConfig(**ENCODEC_32K),
        decoder=MusicgenDecoderConfig(**DECODER),
    )).eval()
    # musicgen-small's generation_config.json: sampling with classifier-free guidance, which runs
    # the decoder on two sequences (with and without the prompt) at every step.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=CODEBOOK_SIZE, pad_token_id=CODEBOOK_SIZE, bos_token_id=CODEBOOK_SIZE,
        do_sample=True, guidance_scale=3.0, max_length=1500,
    )
    # Saved aside and renamed once whole, so that an interrupted build is not taken for a model.
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    # A letters-only vocabulary (ids below T5's 32,128): the prompt comes out about four times
    # longer than t5-base's tokenizer would make it, which costs only the one encoder pass and a
    # few more cross-attention keys, little beside the decoder's 24 layers at every step.
    MusicgenProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=32_000),
        tokenizer=T5Tokenizer(vocab=t5_vocab(), extra_ids=0),
    ).save_pretrained(partial)
    partial.rename(out)
    return config


def fix_length(backend, tokens: int) -> None:
    """`tokens` decoder steps, each one token in each of the 4 codebooks (50 steps a second of audio;
    the delay pattern spends the first 3). MusicGen has no end token: the limit is the length."""
    generate = backend.model.generate

    def fixed(*args, **kwargs):
        return generate(*args, **{**kwargs, "max_new_tokens": tokens})

    backend.model.generate = fixed


def parameters(backend) -> int:
    return sum(parameter.numel() for parameter in backend.model.parameters())

