"""Builds a tiny, randomly initialised VALL-E X with its EnCodec and Vocos, placed where the
unchanged tts-webui-valle-x loaders look.

Run with the VALL-E X environment's python:
    python valle_models.py <models_dir> <torch_home> <hf_home>
writes <models_dir>/vall-e-x/vallex-checkpoint.pt, EnCodec's weights in torch hub's cache and
Vocos's config and weights in a Hugging Face cache.

The package builds its transformer with fixed sizes (1024 wide, 12 layers: 370M parameters);
`shrink()` lowers those constants in the package's generation module, and must run in every
process that loads the tiny checkpoint (the tests do it from a sitecustomize). Everything else,
the tokenizers, EnCodec and Vocos, keeps its real architecture.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TINY = {"N_DIM": 32, "NUM_HEAD": 2, "NUM_LAYERS": 1}
VOCOS_REPO = "charactr/vocos-encodec-24khz"
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
    dim: 32
    intermediate_dim: 64
    num_layers: 1
    adanorm_num_embeddings: 4
head:
  class_path: vocos.heads.ISTFTHead
  init_args:
    dim: 32
    n_fft: 1280
    hop_length: 320
    padding: same
"""


def shrink() -> None:
    from valle_x.utils import generation

    for name, value in TINY.items():
        setattr(generation, name, value)


def build(models_dir: Path, torch_home: Path, hf_home: Path) -> None:
    os.environ["TORCH_HOME"] = str(torch_home)
    import torch
    from encodec import EncodecModel

    torch.manual_seed(0)
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    torch.save(EncodecModel.encodec_model_24khz(pretrained=False).state_dict(),
               hub / "encodec_24khz-d7cc33bc.th")

    from hf_cache import snapshot  # beside this file; the worker's hook copy never builds
    from vocos import Vocos

    folder = snapshot(hf_home, VOCOS_REPO)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(VOCOS_CONFIG)
    vocos = Vocos.from_hparams(str(folder / "config.yaml"))
    state = {k: v for k, v in vocos.state_dict().items() if not k.startswith("feature_extractor.encodec.")}
    torch.save(state, folder / "pytorch_model.bin")

    shrink()
    from valle_x.models.vallex import VALLE
    from valle_x.utils import generation as g

    # The same constructor call as the package's preload_models.
    model = VALLE(g.N_DIM, g.NUM_HEAD, g.NUM_LAYERS, norm_first=True, add_prenet=False,
                  prefix_mode=g.PREFIX_MODE, share_embedding=True, nar_scale_factor=1.0,
                  prepend_bos=True, num_quantizers=g.NUM_QUANTIZERS)
    # Random weights almost never pick the end-of-audio token, so the autoregressive stage
    # would run to its length cap (16 frames per phoneme, minutes on a CPU). Pin one feature of
    # the final norm to 1 and tie two logits to it alone: token 1 stays the most likely and the
    # end token has a fixed share, ending a clip after about 80 frames (one second). Every
    # other logit still depends on the text and the prompt.
    with torch.no_grad():
        norm = model.ar_decoder.norm
        norm.weight[0] = 0.0
        norm.bias[0] = 1.0
        logits = model.ar_predict_layer.weight
        logits[:, 0] = 0.0
        for token, value in ((1, 5.0), (-1, 2.7)):  # -1: the end token, NUM_AUDIO_TOKENS
            logits[token] = 0.0
            logits[token, 0] = value
    target = models_dir / "vall-e-x" / "vallex-checkpoint.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, target)


if __name__ == "__main__":
    build(*(Path(arg) for arg in sys.argv[1:4]))
