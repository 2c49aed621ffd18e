"""VALL-E X at its released size with random weights, with EnCodec and Vocos at theirs, placed
where the unchanged tts-webui-valle-x loaders look (as tests/tiny_models/valle_models.py does,
without shrinking anything)."""

from __future__ import annotations

import os
from pathlib import Path

SOURCE = ("Plachtaa/VALL-E-X vallex-checkpoint.pt (sizes: valle_x.macros, which the loader builds "
          "it from), charactr/vocos-encodec-24khz config.yaml, EnCodec 24 kHz (encodec package)")
FOLDER = "vall-e-x"
# A bundled prompt of 3 s (225 frames) of English speech: a cloned voice, as VALL-E X is used.
REQUEST = {"voice": "librispeech_1", "language": "en"}
VOCOS_REPO = "charactr/vocos-encodec-24khz"
# charactr/vocos-encodec-24khz config.yaml, as released.
VOCOS_CONFIG = """\
feature_extractor:
  class_path: vocos.feature_extractors.EncodecFeatures
  init_args:
    encodec_model: encodec_24khz
    bandwidths: [1.5, 3.0, 6.0, 12.0]
    train_codebooks: false
backbone:
  class_path: vocos.models.VocosBackbone
  init_args:
    input_channels: 128
    dim: 384
    intermediate_dim: 1152
    num_layers: 8
    adanorm_num_embeddings: 4
head:
  class_path: vocos.heads.ISTFTHead
  init_args:
    dim: 384
    n_fft: 1280
    hop_length: 320
    padding: same
"""


def build(models_dir: Path) -> dict:
    # Where the backend's loaders read from: EnCodec from torch hub's cache, Vocos from the
    # Hugging Face cache (read when huggingface_hub is first imported, so set before that).
    os.environ["TORCH_HOME"] = str(models_dir / "torch")
    os.environ["HF_HOME"] = str(models_dir / "huggingface")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = {"name": "vall-e-x", "backend": "vall-e-x", "parameters": {}}
    checkpoint = models_dir / FOLDER / "vallex-checkpoint.pt"
    if checkpoint.is_file():  # written last
        return config
    import torch
    from encodec import EncodecModel

    torch.manual_seed(0)
    hub = models_dir / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    torch.save(EncodecModel.encodec_model_24khz(pretrained=False).state_dict(),
               hub / "encodec_24khz-d7cc33bc.th")

    from vocos import Vocos

    cache = models_dir / "huggingface" / "hub" / ("models--" + VOCOS_REPO.replace("/", "--"))
    revision = "0" * 40
    (cache / "refs").mkdir(parents=True, exist_ok=True)
    (cache / "refs" / "main").write_text(revision)
    snapshot = cache / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.yaml").write_text(VOCOS_CONFIG)
    vocos = Vocos.from_hparams(str(snapshot / "config.yaml"))
    # The released file leaves out the EnCodec inside; from_pretrained adds it from torch hub.
    state = {k: v for k, v in vocos.state_dict().items() if not k.startswith("feature_extractor.encodec.")}
    torch.save(state, snapshot / "pytorch_model.bin")

    # Not valle_x.utils.generation: it fixes its device at import, which the backend does itself.
    from valle_x import macros
    from valle_x.models.vallex import VALLE

    # The same constructor call as the package's preload_models, which loads strictly.
    model = VALLE(macros.N_DIM, macros.NUM_HEAD, macros.NUM_LAYERS, norm_first=True, add_prenet=False,
                  prefix_mode=macros.PREFIX_MODE, share_embedding=True, nar_scale_factor=1.0,
                  prepend_bos=True, num_quantizers=macros.NUM_QUANTIZERS)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, checkpoint.with_suffix(".partial"))
    checkpoint.with_suffix(".partial").replace(checkpoint)
    return config


def fix_length(backend, tokens: int) -> None:
    """Each request's autoregressive stage makes exactly `tokens` tokens: the end token is
    masked out of every sampling step, then forced at step `tokens + 1`, where the loop stops.
    An AR token is one EnCodec frame of the first codebook, 320 samples at 24 kHz (13.3 ms,
    75 a second); the NAR stage then fills the other 7 codebooks for all frames, 7 passes."""
    import torch
    from valle_x.models import vallex
    from valle_x.utils import generation

    end, sample, inference = vallex.NUM_AUDIO_TOKENS, vallex.topk_sampling, generation.model.inference
    steps = 0  # generation runs one request at a time (the backend's lock)

    def counted(*args, **kwargs):
        nonlocal steps
        steps = 0
        return inference(*args, **kwargs)

    def sampling(logits, **kwargs):
        nonlocal steps
        steps += 1
        logits[:, end] = -torch.inf
        token, logprobs = sample(logits, **kwargs)
        if steps > tokens:
            token[:] = end
        return token, logprobs

    generation.model.inference = counted
    vallex.topk_sampling = sampling  # looked up in the module at every step


def parameters(backend) -> int:
    """VALL-E X's AR and NAR transformers and Vocos, without the EnCodec inside Vocos (only its
    codebooks, copied out, run per request)."""
    from valle_x.utils import generation

    count = sum(p.numel() for p in generation.model.parameters())
    vocos = sum(p.numel() for p in generation.vocos.parameters())
    return count + vocos - sum(p.numel() for p in generation.vocos.feature_extractor.encodec.parameters())
