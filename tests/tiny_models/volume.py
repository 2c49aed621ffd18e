"""A tiny model for every heavy backend, built in each backend's own image and laid out the way
a models volume holds real weights, with a config and a request for each: the container tests
serve them from the compose stack, bench/modal_app.py times their loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.audio import write_voice_like_wav
from tests.containers import REPO, image_python
from tests.tiny_models.harness import build_tiny_model

#: backend -> (its tiny model's config, the request that speaks with it: route, body, params)
HEAVY = {
    "bark": ({"name": "tiny-bark", "backend": "bark", "parameters": {"model": "tiny-bark"}},
             ("/v1/audio/speech", {"input": "Hello there, friend.", "voice": "alloy", "response_format": "wav"})),
    "coqui": ({"name": "tiny-vits", "backend": "coqui", "parameters": {"model": "vits/model.pth", "language": "en"},
               "tts": {"voice": "bob"}},
              ("/v1/audio/speech", {"input": "Hello there, friend.", "voice": "alloy", "response_format": "wav"})),
    # The tiny Parler-TTS samples where it stops (unseeded, a CI run got 0.16 s): ElevenLabs' seed
    # makes the take repeatable.
    "parler-tts": ({"name": "tiny-parler", "backend": "parler-tts", "parameters": {"model": "tiny-parler"}},
                   ("/v1/text-to-speech/alloy", {"text": "Hello there, friend.", "model_id": "tiny-parler",
                                                 "seed": 1, "output_format": "wav_24000"})),
    "transformers-musicgen": (
        {"name": "tiny-music", "backend": "transformers-musicgen", "parameters": {"model": "tiny-musicgen"}},
        ("/v1/sound-generation", {"text": "Rain on a tin roof.", "duration_seconds": 0.5, "output_format": "wav_32000"}),
    ),
    # A tiny random VALL-E X ends a clip at a random frame: seeded (ElevenLabs' request carries a
    # seed) so that a run is repeatable, and any whole EnCodec frame counts (as in test_valle.py).
    "vall-e-x": ({"name": "tiny-valle", "backend": "vall-e-x",
                  "tts": {"vall-e": {"audio_path": "reference.wav", "transcript": "Hello there, how are you?"}}},
                 ("/v1/text-to-speech/tiny-valle", {"text": "Hello there, friend.", "model_id": "tiny-valle",
                                                    "seed": 5, "output_format": "wav_24000"})),
    "kokoro": ({"name": "tiny-kokoro", "backend": "kokoro", "parameters": {"model": "tiny-kokoro/kokoro-v1.0.onnx"}},
               ("/v1/audio/speech", {"input": "Hello there, friend.", "voice": "af_bella(2)+af_sky(1)",
                                     "response_format": "wav"})),
}


def place_tiny_models(seed: Path) -> None:
    """Lay out in `seed` what the models volume should hold: each backend's tiny model, built in
    its own image, where its worker's image looks for it."""
    build_tiny_model(image_python("bark"), "bark", seed / "tiny-bark")
    build_tiny_model(image_python("parler-tts"), "parler", seed / "tiny-parler")
    build_tiny_model(image_python("transformers-musicgen"), "musicgen", seed / "tiny-musicgen")
    # Kokoro's image has onnxruntime, not the onnx package the builder writes graphs with.
    build_tiny_model(Path(sys.executable), "kokoro_model", seed / "tiny-kokoro")
    builders = REPO / "tests" / "tiny_models"
    subprocess.run([str(image_python("coqui")), str(builders / "coqui_models.py"), "vits", str(seed / "vits")],
                   check=True, capture_output=True, timeout=600)
    # Coqui's config names its speakers file by absolute path: where the worker will see it.
    config = seed / "vits" / "config.json"
    config.write_text(config.read_text().replace(str(seed), "/models"))
    for folder in ("torch", "huggingface"):
        (seed / folder).mkdir(exist_ok=True)
    subprocess.run([str(image_python("vall-e-x")), str(builders / "valle_models.py"), str(seed),
                    str(seed / "torch"), str(seed / "huggingface")], check=True, capture_output=True, timeout=600)
    write_voice_like_wav(seed / "reference.wav", 3.0, 24000)
    # The tiny VALL-E X architecture is a patch every process of its worker must load.
    hooks = seed / "test-hooks"
    hooks.mkdir()
    shutil.copy(builders / "valle_models.py", hooks)
    (hooks / "sitecustomize.py").write_text("import valle_models\nvalle_models.shrink()\n")
