"""Bark at suno/bark-small's sizes with random weights, laid out as tests/tiny_models/bark.py lays
out its tiny one (model, BERT tokenizer, voice presets), so the production backend loads it offline."""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = (
    "suno/bark-small config.json: three GPT-2-small stages (12 layers, 768 wide, 12 heads, no biases, "
    "block 1024; Bark's vocabularies) and EnCodec 24 kHz (facebook/encodec_24khz, EncodecConfig's defaults)"
)
FOLDER = "suno-bark-small"
REQUEST = {"voice": "v2/en_speaker_6"}

# suno/bark-small config.json's numbers, as suno's model card (github.com/suno-ai/bark model-card.md) has
# them: 80M parameters a stage, GPT-2 small's shape (12 x 12 x 768^2 = 85M without embeddings), 404M
# in all with the codec, what a 16-bit copy of bark-small weighs (809 MB). The vocabularies are
# Bark's own, and must be: its token offsets are computed from them.
STAGE = {
    "hidden_size": 768, "num_layers": 12, "num_heads": 12, "block_size": 1024, "bias": False, "dropout": 0.0,
}
SEMANTIC = {**STAGE, "input_vocab_size": 129_600, "output_vocab_size": 10_048}
COARSE = {**STAGE, "input_vocab_size": 12_096, "output_vocab_size": 12_096}
FINE = {**STAGE, "input_vocab_size": 1056, "output_vocab_size": 1056, "n_codes_total": 8, "n_codes_given": 1}
# A preset as long as suno's (about 8 s): the coarse and fine stages take that much history in.
PRESET_SECONDS = 8


def build(models_dir: Path) -> dict:
    config = {"name": "bark-small", "backend": "bark", "parameters": {"model": FOLDER}}
    out = Path(models_dir) / FOLDER
    if (out / "speaker_embeddings_path.json").is_file():  # written last
        return config

    import numpy as np
    import torch
    from transformers import BarkConfig, BarkModel, BarkProcessor, EncodecConfig, GenerationConfig
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig,
        BarkFineGenerationConfig,
        BarkSemanticGenerationConfig,
    )

    from tests.tiny_models.bark import tokenizer

    torch.manual_seed(0)
    model = BarkModel(BarkConfig(
        semantic_config=SEMANTIC, coarse_acoustics_config=COARSE, fine_acoustics_config=FINE,
        codec_config=EncodecConfig().to_dict(),
    )).eval()
    # BarkGenerationConfig cannot be saved; a plain GenerationConfig with its three parts can. The
    # parts' defaults are suno's (768 semantic tokens at most, coarse windows of 60, ...).
    model.generation_config = GenerationConfig(
        semantic_config=BarkSemanticGenerationConfig(do_sample=True).to_dict(),
        coarse_acoustics_config=BarkCoarseGenerationConfig(do_sample=True).to_dict(),
        fine_acoustics_config=BarkFineGenerationConfig().to_dict(),
        sample_rate=24_000,
        codebook_size=1024,
    )
    model.save_pretrained(out)
    # The text is padded or cut to 256 tokens whatever the tokenizer: a small one costs the same.
    BarkProcessor(tokenizer=tokenizer()).save_pretrained(out)

    rng = np.random.default_rng(0)
    arrays = {  # semantic tokens at 49.9 a second, EnCodec frames at 75
        "semantic_prompt": rng.integers(0, 10_000, round(PRESET_SECONDS * 49.9)),
        "coarse_prompt": rng.integers(0, 1024, (2, PRESET_SECONDS * 75)),
        "fine_prompt": rng.integers(0, 1024, (8, PRESET_SECONDS * 75)),
    }
    preset = REQUEST["voice"]
    paths = {}
    for key, array in arrays.items():
        paths[key] = f"speaker_embeddings/{preset}_{key}.npy"
        (out / paths[key]).parent.mkdir(parents=True, exist_ok=True)
        np.save(out / paths[key], array)
    (out / "speaker_embeddings_path.json").write_text(json.dumps({"repo_or_path": str(out), preset: paths}))
    return config


def fix_length(backend, tokens: int) -> None:
    """`tokens` semantic tokens (49.9 a second of audio): the stage that decides the length. The coarse
    stage then makes 2 x 75 / 49.9 tokens for each (about 3), in windows of 60, and the fine stage
    fills the other six codebooks; neither can stop early, so only the semantic stage is held."""
    generate = backend.model.generate

    def fixed(*args, **kwargs):
        return generate(*args, semantic_min_new_tokens=tokens, semantic_max_new_tokens=tokens, **kwargs)

    backend.model.generate = fixed


def parameters(backend) -> int:
    return sum(parameter.numel() for parameter in backend.model.parameters())

