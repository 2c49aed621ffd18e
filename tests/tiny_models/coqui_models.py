"""Builds tiny, randomly initialised Coqui models on disk, laid out the way real ones are.

Run with the Coqui environment's python: `python coqui_models.py <kind> <folder>`.
  vits  -> <folder>/model.pth + config.json: a multi-speaker, multi-language VITS.
  xtts  -> <folder>/model.pth, config.json, vocab.json, speakers_xtts.pth: an XTTS v2 with a
           hand-made BPE vocabulary and one preset speaker.
  xtts-hf <hf_home> -> the same XTTS placed in a Hugging Face cache as the released
           tts_models/multilingual/multi-dataset/xtts_v2 is, so it loads by name offline.
The weights are random: the audio is noise-like, but every layer of the real model runs.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch

VITS_SPEAKERS = ["alice", "bob"]
VITS_LANGUAGES = ["en", "fr"]
XTTS_PRESET = "Ana Florence"
XTTS_LANGUAGES = ["en", "fr", "de"]
# The repository and revision the released xtts_v2 resolves to in coqui-tts's model list.
XTTS_REPO = "tts-hub/XTTS-v2"


def build_vits(folder: Path) -> Path:
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits, VitsArgs
    from TTS.tts.utils.text.characters import CharactersConfig

    folder.mkdir(parents=True, exist_ok=True)
    args = VitsArgs(
        hidden_channels=16, hidden_channels_ffn_text_encoder=32, num_heads_text_encoder=2,
        num_layers_text_encoder=1, num_layers_flow=1, num_layers_posterior_encoder=1,
        upsample_initial_channel_decoder=32,
        upsample_rates_decoder=[8, 8, 2, 2], upsample_kernel_sizes_decoder=[16, 16, 4, 4],
        resblock_kernel_sizes_decoder=[3], resblock_dilation_sizes_decoder=[[1, 3, 5]],
        use_speaker_embedding=True, speaker_embedding_channels=8,
        use_language_embedding=True, embedded_language_dim=4,
    )
    config = VitsConfig(
        model_args=args, use_phonemes=False, text_cleaner="basic_cleaners",
        characters=CharactersConfig(
            characters_class="TTS.tts.models.vits.VitsCharacters", pad="_", eos="", bos="",
            blank=None, characters=string.ascii_lowercase, punctuations="!'(),-.:;? ",
            phonemes=None,
        ),
        use_speaker_embedding=True,
    )
    config.audio.sample_rate = 16000
    (folder / "speakers.json").write_text(json.dumps({s: i for i, s in enumerate(VITS_SPEAKERS)}))
    (folder / "language_ids.json").write_text(json.dumps({l: i for i, l in enumerate(VITS_LANGUAGES)}))
    config.model_args.speakers_file = str(folder / "speakers.json")
    config.speakers_file = str(folder / "speakers.json")
    config.model_args.language_ids_file = str(folder / "language_ids.json")
    torch.manual_seed(0)
    model = Vits.init_from_config(config)
    model.eval()
    torch.save({"model": model.state_dict(), "config": config.to_dict()}, folder / "model.pth")
    config.save_json(str(folder / "config.json"))
    return folder / "model.pth"


def _xtts_vocab(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["[STOP]", "[UNK]", "[SPACE]", "[START]"] + [f"[{l}]" for l in XTTS_LANGUAGES]
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-:;\"()") + list("àâçéèêëîïôûùüÿœæäöß")
    vocab = {token: i for i, token in enumerate(specials + symbols)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(path))


def build_xtts(folder: Path) -> Path:
    from TTS.tts.configs.xtts_config import XttsArgs, XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts

    folder.mkdir(parents=True, exist_ok=True)
    _xtts_vocab(folder / "vocab.json")
    channels = 64
    config = XttsConfig(
        model_args=XttsArgs(
            gpt_layers=2, gpt_n_model_channels=channels, gpt_n_heads=2, decoder_input_dim=channels,
            # Random weights rarely pick the stop token: cap the clip at about one second.
            gpt_max_audio_tokens=24, gpt_max_text_tokens=402, gpt_max_prompt_tokens=70,
            tokenizer_file=str(folder / "vocab.json"),
        ),
        languages=XTTS_LANGUAGES,
    )
    torch.manual_seed(0)
    model = Xtts(config)
    # As load_checkpoint does: the vocabulary sets the GPT's text token count.
    model.tokenizer = VoiceBpeTokenizer(vocab_file=str(folder / "vocab.json"))
    model.init_models()
    model.eval()
    torch.save({"model": model.state_dict()}, folder / "model.pth")
    config.model_args.tokenizer_file = ""
    config.save_json(str(folder / "config.json"))
    latents = {
        XTTS_PRESET: {
            "gpt_cond_latent": torch.randn(1, 32, channels),
            "speaker_embedding": torch.randn(1, 512, 1),
        }
    }
    torch.save(latents, folder / "speakers_xtts.pth")
    return folder / "model.pth"


def build_xtts_hf(hf_home: Path) -> Path:
    repo = hf_home / "hub" / ("models--" + XTTS_REPO.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    build_xtts(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


if __name__ == "__main__":
    kind, target = sys.argv[1], Path(sys.argv[2])
    builders = {"vits": build_vits, "xtts": build_xtts, "xtts-hf": build_xtts_hf}
    print(builders[kind](target))
