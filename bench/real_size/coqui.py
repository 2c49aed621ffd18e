"""Coqui XTTS v2 at its released sizes with random weights, in the folder layout XTTS loads
(model.pth, config.json, vocab.json, speakers_xtts.pth), as tests/tiny_models/coqui_models.py
lays out its tiny one."""

from __future__ import annotations

import string
from pathlib import Path

SOURCE = "coqui/XTTS-v2 config.json (its model_args and sampling settings, in bench/real_size/coqui.py)"
FOLDER = "xtts-v2"
PRESET = "Ana Florence"
REQUEST = {"language": "en", "voice": PRESET}

# coqui/XTTS-v2 config.json, "model_args": where it differs from coqui-tts's XttsArgs defaults
# (8194 audio tokens, no perceiver resampler), the release wins. The HiFi-GAN decoder and its
# speaker encoder take fixed sizes from coqui-tts's code; the DVAE is only used in training
# (load_checkpoint drops its keys), so it is not built.
MODEL_ARGS = {
    "gpt_layers": 30, "gpt_n_model_channels": 1024, "gpt_n_heads": 16,
    "gpt_number_text_tokens": 6681, "gpt_num_audio_tokens": 1026,
    "gpt_start_audio_token": 1024, "gpt_stop_audio_token": 1025,
    "gpt_max_audio_tokens": 605, "gpt_max_text_tokens": 402, "gpt_max_prompt_tokens": 70,
    "gpt_code_stride_len": 1024, "gpt_use_perceiver_resampler": True,
    "gpt_use_masking_gt_prompt_approach": True, "kv_cache": True,
    "input_sample_rate": 22050, "output_sample_rate": 24000, "output_hop_length": 256,
    "decoder_input_dim": 1024, "d_vector_dim": 512, "cond_d_vector_in_each_upsampling_layer": True,
}
# The same file's sampling settings, which the backend passes to every inference call.
SAMPLING = {"temperature": 0.75, "length_penalty": 1.0, "repetition_penalty": 5.0, "top_k": 50,
            "top_p": 0.85, "gpt_cond_len": 30, "gpt_cond_chunk_len": 4, "max_ref_len": 30}
LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu",
             "ko", "ja", "hi"]


def _vocab(path: Path) -> None:
    """A BPE vocabulary of the released size (6681 ids, which set the GPT's text embedding).
    Every letter pair is a merge, so English splits into about two letters a token, near what
    the released vocabulary gives; the ids above those only fill the table."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["[STOP]", "[UNK]", "[SPACE]", "[START]"] + [f"[{lang}]" for lang in LANGUAGES]
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-:;\"()") + list("àâçéèêëîïôûùüÿœæäöß")
    merges = [(a, b) for a in string.ascii_lowercase for b in string.ascii_lowercase]
    tokens = specials + symbols + [a + b for a, b in merges]
    tokens += [f"~{i}" for i in range(MODEL_ARGS["gpt_number_text_tokens"] - len(tokens))]
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(path))


def build(models_dir: Path) -> dict:
    folder = models_dir / FOLDER
    config = {"name": "xtts-v2", "backend": "coqui", "parameters": {"model": FOLDER}}
    if (folder / "speakers_xtts.pth").is_file():  # written last
        return config
    import torch
    from TTS.tts.configs.xtts_config import XttsArgs, XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts

    folder.mkdir(parents=True, exist_ok=True)
    _vocab(folder / "vocab.json")
    xtts_config = XttsConfig(model_args=XttsArgs(**MODEL_ARGS), languages=LANGUAGES, **SAMPLING)
    torch.manual_seed(0)
    model = Xtts(xtts_config)
    # As load_checkpoint does: the vocabulary sets the GPT's text token count and its ids.
    model.tokenizer = VoiceBpeTokenizer(vocab_file=str(folder / "vocab.json"))
    model.init_models()
    assert model.args.gpt_number_text_tokens == MODEL_ARGS["gpt_number_text_tokens"]
    model.eval()  # Xtts's own eval() returns None
    torch.save({"model": model.state_dict()}, folder / "model.pth")
    xtts_config.save_json(str(folder / "config.json"))
    # One preset voice, shaped as the released file's: the perceiver's 32 latents and the
    # speaker encoder's 512-wide embedding.
    latents = {"gpt_cond_latent": torch.randn(1, 32, MODEL_ARGS["gpt_n_model_channels"]),
               "speaker_embedding": torch.randn(1, MODEL_ARGS["d_vector_dim"], 1)}
    torch.save({PRESET: latents}, folder / "speakers_xtts.pth")
    return config


def fix_length(backend, tokens: int) -> None:
    """Every generation of the GPT (one per request: `generate`, or `get_generator` when the
    chunk is streamed) makes exactly `tokens` audio tokens: max_gen_mel_tokens is the cap it puts
    on the length, and min_new_tokens masks the stop token until then. An audio token is one DVAE
    code standing for 1024 samples at 22.05 kHz: 46.4 ms of speech, 21.5 a second."""
    gpt = backend._model.gpt
    gpt.max_gen_mel_tokens = tokens
    for name in ("generate", "get_generator"):
        setattr(gpt, name, _at_least(getattr(gpt, name), tokens))


def _at_least(generation, tokens: int):
    def fixed(*args, **kwargs):
        return generation(*args, **kwargs, min_new_tokens=tokens)

    return fixed


def parameters(backend) -> int:
    return sum(p.numel() for p in backend._model.parameters())
