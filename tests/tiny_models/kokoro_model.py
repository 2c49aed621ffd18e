"""A tiny Kokoro: an ONNX graph with the released kokoro-v1.0.onnx's inputs and outputs (`tokens`,
a 256-wide `style`, the `speed`; the `audio` at 24 kHz, and each token's `duration` in frames, which
kokoro-onnx's own exports add)
and a voices file like voices-v1.0.bin (an .npz of style tables, one per voice of the release, with
32 rows where the real ones have 510: a longer text takes the last), written to the folder given.
Each token lasts 4 frames of 600 samples at speed 1, fewer when faster; the audio is a tone whose
pitch follows the style, so that voices and mixes sound apart.

    python tests/tiny_models/kokoro_model.py FOLDER [--no-durations]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

#: Kokoro-82M v1.0's voices (its VOICES.md), so that the example config's voice map resolves.
VOICES = (
    "af_heart", "af_alloy", "af_aoede", "af_bella", "af_jessica", "af_kore", "af_nicole", "af_nova", "af_river",
    "af_sarah", "af_sky", "am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam", "am_michael", "am_onyx",
    "am_puck", "am_santa", "bf_alice", "bf_emma", "bf_isabella", "bf_lily", "bm_daniel", "bm_fable", "bm_george",
    "bm_lewis", "ef_dora", "em_alex", "em_santa", "ff_siwis", "hf_alpha", "hf_beta", "hm_omega", "hm_psi",
    "if_sara", "im_nicola", "jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo", "pf_dora",
    "pm_alex", "pm_santa", "zf_xiaobei", "zf_xiaoni", "zf_xiaoxiao", "zf_xiaoyi", "zm_yunjian", "zm_yunxi",
    "zm_yunxia", "zm_yunyang",
)
FRAMES_PER_TOKEN = 4.0
SAMPLES_PER_FRAME = 600
SAMPLE_RATE = 24000


def _constant(name: str, value: float | int, dtype: int = TensorProto.FLOAT) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))


def tiny_model(durations: bool = True) -> onnx.ModelProto:
    nodes = [
        _constant("frames", FRAMES_PER_TOKEN),
        _constant("samples_per_frame", SAMPLES_PER_FRAME, TensorProto.INT64),
        _constant("zero", 0.0),
        _constant("one", 1.0),
        _constant("omega_base", 2 * np.pi * 220 / SAMPLE_RATE),
        _constant("omega_per_style", 2 * np.pi * 100 / SAMPLE_RATE),
        _constant("loudness", 0.3),
        helper.make_node("Constant", [], ["tokens_axis"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
        # Each token's frames: ceil(4 / speed), as the real model's durations shrink with speed.
        helper.make_node("Shape", ["tokens"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "tokens_axis"], ["token_count"], axis=0),
        helper.make_node("Div", ["frames", "speed"], ["frames_at_speed"]),
        helper.make_node("Ceil", ["frames_at_speed"], ["frames_ceil"]),
        helper.make_node("Cast", ["frames_ceil"], ["frames_int"], to=TensorProto.INT64),
        helper.make_node("Expand", ["frames_int", "token_count"], ["duration"]),
        helper.make_node("ReduceSum", ["duration"], ["total_frames"], keepdims=0),
        helper.make_node("Mul", ["total_frames", "samples_per_frame"], ["total_samples"]),
        helper.make_node("Cast", ["total_samples"], ["total_float"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "total_float", "one"], ["t"]),
        # Pitch from the style's mean: 220 Hz plus up to 100 Hz either way.
        helper.make_node("ReduceMean", ["style"], ["style_mean"], keepdims=0),
        helper.make_node("Mul", ["style_mean", "omega_per_style"], ["omega_shift"]),
        helper.make_node("Add", ["omega_base", "omega_shift"], ["omega"]),
        helper.make_node("Mul", ["t", "omega"], ["phase"]),
        helper.make_node("Sin", ["phase"], ["tone"]),
        helper.make_node("Mul", ["tone", "loudness"], ["audio"]),
    ]
    outputs = [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["samples"])]
    if durations:
        outputs.append(helper.make_tensor_value_info("duration", TensorProto.INT64, ["tokens"]))
    graph = helper.make_graph(
        nodes, "tiny-kokoro",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "tokens"]),
         helper.make_tensor_value_info("style", TensorProto.FLOAT, [1, 256]),
         helper.make_tensor_value_info("speed", TensorProto.FLOAT, [1])],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # The ONNX Runtime in the image reads IR version 9 and later.
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def tiny_voices() -> dict[str, np.ndarray]:
    """Each voice's style rows share one offset, so its tone has a pitch of its own."""
    random = np.random.default_rng(0)
    return {name: (random.normal(0, 0.05, (32, 1, 256)) + (number % 7 - 3) * 0.3).astype(np.float32)
            for number, name in enumerate(VOICES)}


def build(folder: Path, durations: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_model(durations), folder / "kokoro-v1.0.onnx")
    with (folder / "voices-v1.0.bin").open("wb") as sink:
        np.savez(sink, **tiny_voices())


if __name__ == "__main__":
    build(Path(sys.argv[1]), durations="--no-durations" not in sys.argv)
