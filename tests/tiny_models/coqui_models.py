"""Builds tiny, randomly initialised Coqui models on disk, laid out the way real ones are.

Run with the Coqui environment's python: `python coqui_models.py <kind> <folder>`.
  vits  -> <folder>/model.pth + config.json: a multi-speaker, multi-language VITS.
  xtts  -> <folder>/model.pth, config.json, vocab.json, speakers_xtts.pth: an XTTS v2 with a
           hand-made BPE vocabulary and one preset speaker.
  xtts-hf <hf_home> -> the same XTTS placed in a Hugging Face cache as the released
           tts_models/multilingual/multi-dataset/xtts_v2 is, so it loads by name offline.
  glow-tts <tts_home> -> a Glow-TTS and its Multi-band MelGAN vocoder in Coqui's model cache,
           as tts_models/en/ljspeech/glow-tts (LocalAI's config-less example) is downloaded.
The weights are random: the audio is noise-like, but every layer of the real model runs.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch
from hf_cache import snapshot

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


#: LocalAI's documented config-less Coqui model, and the vocoder its entry in Coqui's list names.
GLOW_TTS = "tts_models/en/ljspeech/glow-tts"
GLOW_TTS_VOCODER = "vocoder_models/en/ljspeech/multiband-melgan"


def build_glow_tts(tts_home: Path) -> Path:
    """A tiny Glow-TTS and a tiny Multi-band MelGAN in Coqui's model cache ($TTS_HOME/tts), in the
    folders the released glow-tts and its default vocoder are downloaded to, so that
    `TTS("tts_models/en/ljspeech/glow-tts")` loads both offline through Coqui's own code."""
    from TTS.tts.configs.glow_tts_config import GlowTTSConfig
    from TTS.tts.models.glow_tts import GlowTTS
    from TTS.tts.utils.text.characters import CharactersConfig
    from TTS.vocoder.configs import MultibandMelganConfig
    from TTS.vocoder.models.gan import GAN

    torch.manual_seed(0)
    cache = tts_home / "tts"
    tts_folder = cache / "--".join(GLOW_TTS.split("/"))
    vocoder_folder = cache / "--".join(GLOW_TTS_VOCODER.split("/"))
    tts_folder.mkdir(parents=True, exist_ok=True)
    vocoder_folder.mkdir(parents=True, exist_ok=True)
    config = GlowTTSConfig(
        hidden_channels_enc=16, hidden_channels_dec=16, hidden_channels_dp=16, num_flow_blocks_dec=2,
        num_block_layers=1, use_phonemes=False, text_cleaner="basic_cleaners",
        characters=CharactersConfig(
            characters_class="TTS.tts.utils.text.characters.Graphemes", pad="_", eos="~", bos="^",
            blank=None, characters=string.ascii_lowercase, punctuations="!'(),-.:;? ", phonemes=None,
        ),
    )
    config.encoder_params = {"kernel_size": 3, "dropout_p": 0.1, "num_layers": 1, "num_heads": 2,
                             "hidden_channels_ffn": 32}
    config.audio.sample_rate = 16000
    model = GlowTTS(config).eval()
    torch.save({"model": model.state_dict(), "config": config.to_dict()}, tts_folder / "model_file.pth")
    config.save_json(str(tts_folder / "config.json"))

    vocoder_config = MultibandMelganConfig()
    vocoder_config.generator_model_params = {"upsample_factors": [8, 4, 2], "num_res_blocks": 1}
    vocoder_config.audio = config.audio
    vocoder = GAN(vocoder_config).eval()
    torch.save({"model": vocoder.state_dict(), "config": vocoder_config.to_dict()},
               vocoder_folder / "model_file.pth")
    vocoder_config.save_json(str(vocoder_folder / "config.json"))
    return tts_folder


def build_xtts_hf(hf_home: Path) -> Path:
    folder = snapshot(hf_home, XTTS_REPO)
    build_xtts(folder)
    return folder


if __name__ == "__main__":
    kind, target = sys.argv[1], Path(sys.argv[2])
    builders = {"vits": build_vits, "xtts": build_xtts, "xtts-hf": build_xtts_hf, "glow-tts": build_glow_tts}
    print(builders[kind](target))
