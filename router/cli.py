"""The `chorus` command: `serve` the router, or `say` a text into an audio file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from functions.config import ConfigError
from router.errors import ChorusError
from router.settings import Settings

FORMAT_BY_EXTENSION = {
    ".wav": "wav", ".mp3": "mp3", ".ogg": "opus", ".opus": "opus", ".flac": "flac",
    ".aac": "aac", ".pcm": "pcm", ".ulaw": "ulaw", ".alaw": "alaw",
}


def _prepare_models(settings: Settings) -> None:
    """Put the bundled default voice in the models directory, where the default config looks."""
    try:
        from functions.piper import install_bundled_voice
    except ImportError:
        return
    install_bundled_voice(settings.models_dir)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from router.app import create_app

    settings = Settings.from_env(
        host=args.host, port=args.port, configs_dir=args.configs, models_dir=args.models
    )
    _prepare_models(settings)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


async def _say(settings: Settings, args: argparse.Namespace, output: Path) -> float:
    from router.encoding import AudioFormat
    from router.registry import ModelRegistry
    from router.runners.local import InProcessRunner
    from router.speech import SpeechService

    codec = args.format or FORMAT_BY_EXTENSION.get(output.suffix.lower(), "wav")
    service = SpeechService(
        ModelRegistry.from_dir(settings.configs_dir, settings.models_dir),
        InProcessRunner(settings.models_dir),
        settings,
    )
    job = service.prepare(
        text=args.text, text_param="TEXT", model=args.model, voice=args.voice, speed=args.speed
    )
    stream = await service.audio(job, AudioFormat(codec))
    size = 0
    with output.open("wb") as file:
        async for data in stream:
            file.write(data)
            size += len(data)
    return size


def say(args: argparse.Namespace) -> int:
    settings = Settings.from_env(configs_dir=args.configs, models_dir=args.models)
    _prepare_models(settings)
    output = Path(args.output)
    size = asyncio.run(_say(settings, args, output))
    print(f"wrote {size} bytes to {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus", description="Chorus: many voices, one endpoint (text-to-speech server)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--configs", type=Path, help="model configs directory (default: configs, or $CHORUS_CONFIGS_DIR)")
        sub.add_argument("--models", type=Path, help="models directory (default: models, or $CHORUS_MODELS_DIR)")

    serve_cmd = commands.add_parser("serve", help="run the HTTP server (LocalAI, OpenAI and ElevenLabs APIs)")
    serve_cmd.add_argument("--host", help="address to listen on (default: 127.0.0.1, or $HOST)")
    serve_cmd.add_argument("--port", type=int, help="port to listen on (default: 8080, or $PORT)")
    serve_cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    common(serve_cmd)
    serve_cmd.set_defaults(func=serve)

    say_cmd = commands.add_parser("say", help="synthesise TEXT into an audio file, without a server")
    say_cmd.add_argument("text", metavar="TEXT", help="what to say")
    say_cmd.add_argument("-o", "--output", default="speech.wav", help="output file (default: speech.wav); its extension picks the format")
    say_cmd.add_argument("--model", help="model name (default: the first config)")
    say_cmd.add_argument("--voice", help="voice name")
    say_cmd.add_argument("--format", choices=sorted(set(FORMAT_BY_EXTENSION.values())), help="audio format (default: from the extension)")
    say_cmd.add_argument("--speed", type=float, default=1.0, help="speaking speed, 0.25 to 4.0 (default: 1.0)")
    common(say_cmd)
    say_cmd.set_defaults(func=say)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ChorusError) as exc:
        print(f"chorus: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
