"""Kokoro-82M at its published sizes with random weights, exported to ONNX as kokoro-onnx's release
(kokoro-v1.0.onnx) was, plus a voices file, for benchmarks that cannot reach the model hub.

    python bench/kokoro_model.py OUT_DIR [--force]

writes OUT_DIR/kokoro-v1.0.onnx and OUT_DIR/voices-v1.0.bin (skipped when both are there).

Random weights are a fair cost measure: the graph, its shapes and so its compute are fixed by the
config, not by the weights' values. The one place values matter is the length: Kokoro predicts each
token's frames, and untrained weights predict about max_dur / 2 = 25 (sigmoids near one half), eight
times real speech; the duration head's bias is set so a token lasts about three frames, as in speech.

The model is the real `kokoro` package's KModel, loaded through its production path (a config dict
and a checkpoint of component state dicts), with torch in a virtual environment of its own, made on
first use ($CHORUS_KOKORO_VENV, default ~/.cache/chorus-bench/kokoro-export), so that Chorus's own
environments never need torch. Nothing is downloaded but those pinned packages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL_FILE, VOICES_FILE = "kokoro-v1.0.onnx", "voices-v1.0.bin"
VENV = Path(os.environ.get("CHORUS_KOKORO_VENV") or Path.home() / ".cache" / "chorus-bench" / "kokoro-export")
# kokoro itself goes in without its dependencies: they bring misaki's G2P (spaCy, espeak), which
# only KPipeline uses; the rest is what importing KModel and exporting it need.
PINS = ["torch==2.13.0", "transformers==4.57.6", "huggingface-hub==0.36.2", "loguru==0.7.3",
        "attrs==25.4.0", "onnx==1.17.0", "numpy==2.3.5"]
NO_DEPS = ["kokoro==0.9.4"]

# hexgrad/Kokoro-82M on Hugging Face, config.json (the v1.0 checkpoint's), sizes as published.
CONFIG = {
    "istftnet": {
        "upsample_kernel_sizes": [20, 12],
        "upsample_rates": [10, 6],
        "gen_istft_hop_size": 5,
        "gen_istft_n_fft": 20,
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "resblock_kernel_sizes": [3, 7, 11],
        "upsample_initial_channel": 512,
    },
    "dim_in": 64,
    "dropout": 0.2,
    "hidden_dim": 512,
    "max_conv_dim": 512,
    "max_dur": 50,
    "multispeaker": True,
    "n_layer": 3,
    "n_mels": 80,
    "n_token": 178,
    "style_dim": 128,
    "text_encoder_kernel_size": 5,
    "plbert": {
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 2048,
        "max_position_embeddings": 512,
        "num_hidden_layers": 12,
        "dropout": 0.1,
    },
    # Phoneme -> token id, the same file's "vocab".
    "vocab": {
        ";": 1, ":": 2, ",": 3, ".": 4, "!": 5, "?": 6, "—": 9, "…": 10, '"': 11, "(": 12, ")": 13,
        "“": 14, "”": 15, " ": 16, "\u0303": 17, "ʣ": 18, "ʥ": 19, "ʦ": 20, "ʨ": 21, "ᵝ": 22, "ꭧ": 23,
        "A": 24, "I": 25, "O": 31, "Q": 33, "S": 35, "T": 36, "W": 39, "Y": 41, "ᵊ": 42, "a": 43,
        "b": 44, "c": 45, "d": 46, "e": 47, "f": 48, "h": 50, "i": 51, "j": 52, "k": 53, "l": 54,
        "m": 55, "n": 56, "o": 57, "p": 58, "q": 59, "r": 60, "s": 61, "t": 62, "u": 63, "v": 64,
        "w": 65, "x": 66, "y": 67, "z": 68, "ɑ": 69, "ɐ": 70, "ɒ": 71, "æ": 72, "β": 75, "ɔ": 76,
        "ɕ": 77, "ç": 78, "ɖ": 80, "ð": 81, "ʤ": 82, "ə": 83, "ɚ": 85, "ɛ": 86, "ɜ": 87, "ɟ": 90,
        "ɡ": 92, "ɥ": 99, "ɨ": 101, "ɪ": 102, "ʝ": 103, "ɯ": 110, "ɰ": 111, "ŋ": 112, "ɳ": 113,
        "ɲ": 114, "ɴ": 115, "ø": 116, "ɸ": 118, "θ": 119, "œ": 120, "ɹ": 123, "ɾ": 125, "ɻ": 126,
        "ʁ": 128, "ɽ": 129, "ʂ": 130, "ʃ": 131, "ʈ": 132, "ʧ": 133, "ʊ": 135, "ʋ": 136, "ʌ": 138,
        "ɣ": 139, "ɤ": 140, "χ": 142, "ʎ": 143, "ʒ": 147, "ʔ": 148, "ˈ": 156, "ˌ": 157, "ː": 158,
        "ʰ": 162, "ʲ": 164, "↓": 169, "→": 171, "↗": 172, "↘": 173, "ᵻ": 177,
    },
}
# Named like voices of the real voices-v1.0.bin: one style row per phoneme count, 510 of them.
VOICES = ("af_heart", "af_bella", "af_sky", "bm_george", "ff_siwis")
FRAMES_PER_TOKEN = 3  # about 75 ms a phoneme: a frame is 600 samples at 24 kHz


def log(message: str) -> None:
    print(f"kokoro_model: {message}", file=sys.stderr, flush=True)


def ensure_venv() -> Path:
    """The export's virtual environment, made (or remade, when the pins change) on first use."""
    python, stamp = VENV / "bin" / "python", VENV / "chorus-pins.txt"
    wanted = "\n".join(PINS + NO_DEPS)
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    log(f"making {VENV} with {' '.join(PINS + NO_DEPS)}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *PINS], check=True)
    subprocess.run([*pip, "--no-deps", *NO_DEPS], check=True)
    stamp.write_text(wanted)
    return python


def write_voices(path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    voices = {name: (0.1 * rng.standard_normal((510, 1, 256))).astype(np.float32) for name in VOICES}
    with path.open("wb") as file:  # np.savez would add .npz to a bare name
        np.savez(file, **voices)


def build(out_dir: Path) -> None:
    """Runs in the export's environment: random model -> checkpoint -> KModel -> ONNX."""
    import importlib.util
    import types
    import warnings

    import onnx
    import torch

    warnings.simplefilter("ignore")  # the tracer's and torch's deprecation notices, known and harmless

    # kokoro's __init__ imports KPipeline and so misaki's G2P, not installed: KModel needs none of
    # it, so the package is entered without running its __init__.
    package = types.ModuleType("kokoro")
    package.__path__ = list(importlib.util.find_spec("kokoro").submodule_search_locations)
    sys.modules["kokoro"] = package
    from kokoro.model import KModel, KModelForONNX

    torch.manual_seed(0)
    checkpoint = out_dir / "kokoro-random.pth"
    torch.save({}, checkpoint)  # an empty checkpoint: KModel keeps its random initialisation
    random = KModel(repo_id="hexgrad/Kokoro-82M", config=CONFIG, model=str(checkpoint))
    with torch.no_grad():  # untrained durations would be ~25 frames a token; make them ~3
        head = random.predictor.duration_proj.linear_layer
        head.weight.mul_(0.01)
        head.bias.fill_(float(torch.logit(torch.tensor(FRAMES_PER_TOKEN / CONFIG["max_dur"]))))
    names = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
    torch.save({name: getattr(random, name).state_dict() for name in names}, checkpoint)

    # The production path: config and checkpoint in, as with the real kokoro-v1_0.pth.
    kmodel = KModel(repo_id="hexgrad/Kokoro-82M", config=CONFIG, model=str(checkpoint), disable_complex=True)
    checkpoint.unlink()
    log(f"parameters: {sum(p.numel() for p in kmodel.parameters()):,}")
    model = KModelForONNX(kmodel).eval()

    # v1.0's inputs are named tokens / style / speed (a float), its first output the audio; the
    # frames per token come second, as kokoro's export script names them.
    tokens = torch.LongTensor([[0, *torch.randint(1, 100, (48,)).tolist(), 0]])
    path = out_dir / MODEL_FILE
    log("exporting to ONNX (opset 17)")
    torch.onnx.export(
        model, (tokens, torch.randn(1, 256), torch.ones(1)), str(path), dynamo=False,
        input_names=["tokens", "style", "speed"], output_names=["audio", "duration"], opset_version=17,
        dynamic_axes={"tokens": {1: "tokens_len"}, "audio": {0: "num_samples"},
                      "duration": {0: "tokens_len"}},
        do_constant_folding=True,
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    # kokoro-onnx reads the vocabulary from this key, where present.
    graph.metadata_props.add(key="kokoro_config", value=json.dumps(CONFIG, ensure_ascii=False))
    onnx.save(graph, str(path))
    for kind, values in (("input", graph.graph.input), ("output", graph.graph.output)):
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            log(f"{kind} {value.name}: {onnx.TensorProto.DataType.Name(tensor.elem_type)} {dims}")
    log(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even when both files are there")
    parser.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out_dir = args.out_dir.resolve()
    if args.in_venv:
        build(out_dir)
        return
    if not args.force and (out_dir / MODEL_FILE).is_file() and (out_dir / VOICES_FILE).is_file():
        log(f"{out_dir} already has {MODEL_FILE} and {VOICES_FILE}")
        return
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    python = ensure_venv()
    subprocess.run([str(python), __file__, str(out_dir), "--in-venv"], check=True)
    write_voices(out_dir / VOICES_FILE)
    log(f"built {out_dir} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
