"""Build a tiny random Bark (semantic, coarse and fine GPT-style models, EnCodec at 24 kHz) with
a BERT tokenizer and two voice presets, and save it the way suno/bark-small is laid out.

Run in the bark environment: `python bark.py <output folder> [preset ...]` (default: two presets).
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import BarkConfig, BarkModel, BarkProcessor, BertTokenizer, EncodecConfig, GenerationConfig
from transformers.models.bark.generation_configuration_bark import (
    BarkCoarseGenerationConfig,
    BarkFineGenerationConfig,
    BarkSemanticGenerationConfig,
)

PRESETS = ("v2/en_speaker_0", "v2/en_speaker_1")


def tokenizer() -> BertTokenizer:
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *(f"##{p}" for p in pieces)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})


def build(folder: str, names: list[str] | tuple[str, ...] = PRESETS) -> None:
    torch.manual_seed(0)
    out = Path(folder)
    # Vocabulary sizes keep Bark's real values: its token offsets are computed from them.
    # Weights as large as a trained model's (initializer_range 1.0), so that the voice preset
    # visibly changes the output: at 0.02 every token is about equally likely.
    small = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "block_size": 1024, "initializer_range": 1.0}
    config = BarkConfig(
        semantic_config={**small, "input_vocab_size": 129_600, "output_vocab_size": 10_048},
        coarse_acoustics_config={**small, "input_vocab_size": 12_096, "output_vocab_size": 12_096},
        fine_acoustics_config={**small, "input_vocab_size": 1056, "output_vocab_size": 1056},
        # Bark's codec: 24 kHz, hop 320 (75 frames a second), 8 codebooks of 1024 at 6 kbit/s.
        codec_config=EncodecConfig(
            sampling_rate=24_000, upsampling_ratios=[8, 5, 4, 2], target_bandwidths=[1.5, 3.0, 6.0],
            codebook_size=1024, hidden_size=16, num_filters=4, num_lstm_layers=1,
        ).to_dict(),
    )
    model = BarkModel(config).eval()
    with torch.no_grad():
        # EnCodec's codebooks start as zeros; random vectors make each token sound different.
        for layer in model.codec_model.quantizer.layers:
            layer.codebook.embed.normal_()
    # BarkGenerationConfig cannot be saved; a plain GenerationConfig with its three parts can.
    # Sampling as suno's checkpoints do; a short semantic stage keeps each clip under a second.
    model.generation_config = GenerationConfig(
        semantic_config=BarkSemanticGenerationConfig(do_sample=True, max_new_tokens=40).to_dict(),
        coarse_acoustics_config=BarkCoarseGenerationConfig(do_sample=True).to_dict(),
        fine_acoustics_config=BarkFineGenerationConfig().to_dict(),
        sample_rate=24_000,
        codebook_size=1024,
    )
    model.save_pretrained(out)
    BarkProcessor(tokenizer=tokenizer()).save_pretrained(out)

    # Voice presets as suno ships them: a semantic history and its coarse and fine codes.
    rng = np.random.default_rng(0)
    presets: dict[str, object] = {"repo_or_path": str(out)}
    for name in names:
        arrays = {
            "semantic_prompt": rng.integers(0, 10_000, 60),
            "coarse_prompt": rng.integers(0, 1024, (2, 90)),
            "fine_prompt": rng.integers(0, 1024, (8, 90)),
        }
        presets[name] = {}
        for key, array in arrays.items():
            path = Path("speaker_embeddings") / f"{name}_{key}.npy"
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / path, array)
            presets[name][key] = str(path)
    (out / "speaker_embeddings_path.json").write_text(json.dumps(presets, indent=2))


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2:] or PRESETS)
