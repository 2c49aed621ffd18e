"""The `chorus` command: run the server, speak a line or a whole book into a file, and look
after the model configs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from functions.config import ConfigError, UnsafePathError, resolve_in, validate_configs
from router.encoding import CODEC_NAMES, AudioFormat, codec_for_extension
from router.errors import ChorusError
from router.settings import Settings, SettingsError


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    """The environment's settings, with the command's --configs and --models over them."""
    return Settings.from_env(configs_dir=args.configs, models_dir=args.models, **overrides)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from router.app import create_app

    settings = _settings(args, host=args.host, port=args.port, wyoming_port=args.wyoming_port,
                         wyoming_zeroconf=args.wyoming_zeroconf)
    if settings.wyoming_zeroconf and settings.wyoming_port is None:
        raise SettingsError("--wyoming-zeroconf announces the Wyoming server: give --wyoming-port too")
    tls = {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise SettingsError("--ssl-certfile and --ssl-keyfile go together: TLS needs both")
    for flag, path in tls.items():
        if path is not None and not Path(path).is_file():
            raise SettingsError(f"--{flag.replace('_', '-')}: {path} is not a file")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, **tls,
                **({"ssl_context_factory": _without_session_tickets} if args.ssl_certfile else {}))
    return 0


def _without_session_tickets(config: object, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's TLS context, issuing no TLS 1.3 session tickets.

    A TLS 1.3 server sends its tickets just after the handshake, as the client sends its first
    request. A client that reads in one thread while another writes (websockets' sync client,
    which ElevenLabs' Python SDK uses for its sockets) then has its reader thread take the tickets
    in from the SSL object while the other thread writes the WebSocket upgrade through it, and
    OpenSSL does not allow one SSL object in two threads at once: about one connection in a
    thousand lost its upgrade request (the server never saw it) and waited for an answer that never
    came, its reader thread stuck in the read past the client's own time-out. Without tickets there
    is nothing to read before the answer. What it costs: a client that reconnects does a full
    handshake instead of resuming its session."""
    context = default()
    context.num_tickets = 0
    return context


async def _write_speech(
    settings: Settings, args: argparse.Namespace, text: str, text_param: str, on_chunk=None
) -> int:
    """Synthesise `text` through the same service the HTTP routes use and write it to
    `args.output` as it arrives; returns the number of bytes written."""
    from router.app import build_runner
    from router.registry import ModelRegistry
    from router.speech import Ask, SpeechService

    output = Path(args.output)
    codec = args.format or codec_for_extension(output.suffix) or "wav"
    runner = build_runner(settings)
    service = SpeechService(
        ModelRegistry.from_dir(settings.configs_dir, settings.models_dir), runner, settings
    )
    try:
        job = service.prepare(Ask(text=text, text_param=text_param, model=args.model, voice=args.voice,
                                  speed=args.speed))
        stream = await service.audio(job, AudioFormat(codec), on_chunk)
        size = 0
        with output.open("wb") as file:
            async for data in stream:
                file.write(data)
                size += len(data)
        return size
    finally:
        await runner.close()


def say(args: argparse.Namespace) -> int:
    settings = _settings(args)
    size = asyncio.run(_write_speech(settings, args, args.text, "TEXT"))
    print(f"wrote {size} bytes to {args.output}")
    return 0


class _Progress:
    """A progress bar over text chunks that also shows how much audio is made and how fast."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.started = time.monotonic()
        self.seconds = 0.0
        self.chunks = 0
        self.bar = tqdm(
            unit="chunk", desc="synthesising", file=sys.stderr, dynamic_ncols=True
        )

    def __call__(self, done: int, total: int, seconds: float) -> None:
        self.seconds += seconds
        self.chunks = done
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.set_postfix_str(f"audio {self.seconds:.1f} s, {self.speed():.1f}x real time", refresh=False)
        self.bar.update(done - self.bar.n)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def speed(self) -> float:
        return self.seconds / max(self.elapsed(), 1e-6)

    def close(self) -> None:
        self.bar.close()


def synth(args: argparse.Namespace) -> int:
    source = sys.stdin if args.file == "-" else None
    try:
        text = source.read() if source else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChorusError(f"cannot read {args.file}: {exc}") from exc
    settings = _settings(args)
    # The server's input limit protects a shared service from one huge request; here the user
    # asks for their own file, which the chunked pipeline handles at any length.
    settings = settings.model_copy(
        update={"max_input_chars": max(settings.max_input_chars, len(text))}
    )
    # Its length comes with the first chunk done: the text is cut once, by the service.
    progress = _Progress()
    try:
        size = asyncio.run(_write_speech(settings, args, text, "--file", progress))
    finally:
        progress.close()
    print(
        f"wrote {args.output}: {progress.seconds:.1f} s of audio from {progress.chunks} chunks "
        f"in {progress.elapsed():.1f} s ({progress.speed():.1f}x real time, {size} bytes)"
    )
    return 0


def models_list(args: argparse.Namespace) -> int:
    from router.registry import ModelRegistry

    settings = _settings(args)
    registry = ModelRegistry.from_dir(settings.configs_dir, settings.models_dir)
    rows = [("MODEL", "BACKEND", "FILE", "IN MODELS DIR")]
    for config in registry.all():
        files = config.file_fields()
        if not files:
            rows.append((config.name, config.backend, "-", "-"))
        for value in files.values():
            present = resolve_in(settings.models_dir, value).exists()
            rows.append((config.name, config.backend, value, "present" if present else "absent"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"\nconfigs: {settings.configs_dir}   models: {settings.models_dir}")
    if any(row[3] == "absent" for row in rows[1:]):
        print(
            "absent: the file is not in the models directory; a backend that takes a hub or "
            "catalogue id may still find it in its own cache. `chorus serve` and `chorus say` "
            "install the bundled Piper voice (en_US-joe-medium) themselves."
        )
    return 0


def models_pull(args: argparse.Namespace) -> int:
    from functions.config import load_configs
    from router.pull import pull

    settings = _settings(args)
    configs = load_configs(settings.configs_dir, settings.models_dir) if settings.configs_dir.is_dir() else []
    for path in pull(args.name, settings.models_dir, {c.name: c for c in configs}):
        print(f"pulled {args.name} into {path}")
    return 0


def configs_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        results = validate_configs(settings.configs_dir, settings.models_dir)
    except ConfigError as exc:
        print(f"FAIL  {exc}")
        return 1
    if not results:
        print(f"FAIL  no *.yaml or *.yml config in {settings.configs_dir}")
        return 1
    problems = 0
    for path, result in results:
        if isinstance(result, ConfigError):
            problems += 1
            print(f"FAIL  {result}")
        else:
            print(f"ok    {path.name}: model '{result.name}' ({result.backend})")
    if problems:
        print(f"\n{problems} of {len(results)} configs in {settings.configs_dir} have problems")
        return 1
    print(f"\n{_configs(len(results))} in {settings.configs_dir}: valid")
    return 0


def _configs(count: int) -> str:
    return f"{count} config" + ("" if count == 1 else "s")


_EPILOG = """\
examples:
  chorus serve                                  # http://127.0.0.1:8080, playground at /
  chorus serve --host 0.0.0.0 --wyoming-port 10200   # and Home Assistant's Wyoming protocol
  chorus say "Hello there." -o hello.mp3
  chorus synth --file book.txt -o book.mp3      # long text, with a progress bar
  chorus models list                            # configs and whether their files are present
  chorus configs check                          # validate every config, exit 1 on a problem

Settings come from the environment (HOST, PORT, CHORUS_CONFIGS_DIR, CHORUS_MODELS_DIR, ...);
each command's options (--configs, --models, --host, --port) override them.
`chorus COMMAND --help` explains each command.
"""


def _speed(value: str) -> float:
    try:
        speed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.25 <= speed <= 4.0:
        raise argparse.ArgumentTypeError(f"{value} is outside 0.25 to 4.0")
    return speed


def _wrap(text: str) -> str:
    # The raw formatter keeps the examples' layout, so the prose is wrapped here.
    return textwrap.fill(text, width=88)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus",
        description=_wrap("Chorus: many voices, one endpoint. A text-to-speech server speaking "
                          "the LocalAI, OpenAI and ElevenLabs APIs, and a command line to use it "
                          "without a server."),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def dirs(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--configs", type=Path, metavar="DIR",
                         help="model configs directory (default: configs, or $CHORUS_CONFIGS_DIR)")
        sub.add_argument("--models", type=Path, metavar="DIR",
                         help="models directory (default: models, or $CHORUS_MODELS_DIR)")

    def voice_options(sub: argparse.ArgumentParser, default_output: str) -> None:
        sub.add_argument("-o", "--output", default=default_output, metavar="FILE",
                         help=f"output file (default: {default_output}); its extension picks the format")
        sub.add_argument("--model", help="model name, as `chorus models list` shows it (default: the first config)")
        sub.add_argument("--voice", help="voice name (default: the model's own voice); "
                         "the server's GET /v1/audio/voices lists them")
        sub.add_argument("--format", choices=CODEC_NAMES,
                         help="audio format (default: from the output file's extension, else wav)")
        sub.add_argument("--speed", type=_speed, default=1.0, help="speaking speed, 0.25 to 4.0 (default: 1.0)")
        dirs(sub)

    def command(name: str, summary: str, description: str, example: str):
        return commands.add_parser(
            name, help=summary, description=_wrap(description), epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    serve_cmd = command(
        "serve", "run the HTTP server (LocalAI, OpenAI and ElevenLabs APIs, playground page)",
        "Run the Chorus server. Open http://HOST:PORT/ in a browser for the playground, or point "
        "an OpenAI client at http://HOST:PORT/v1. With --wyoming-port, Home Assistant's Wyoming "
        "integration reaches every voice at HOST:WYOMING_PORT.",
        "chorus serve --host 0.0.0.0 --port 8080",
    )
    serve_cmd.add_argument("--host", help="address to listen on (default: 127.0.0.1, or $HOST)")
    serve_cmd.add_argument("--port", type=int, help="port to listen on (default: 8080, or $PORT)")
    serve_cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # ElevenLabs' SDK dials its WebSockets over wss:// only.
    serve_cmd.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM), with --ssl-keyfile")
    serve_cmd.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    # Home Assistant's voice assistants reach TTS engines over Wyoming (port 10200 by custom).
    serve_cmd.add_argument("--wyoming-port", type=int, metavar="PORT",
                           help="also serve the Wyoming protocol (Home Assistant) on this TCP port, on --host; "
                                "no authentication: keep it on the LAN (default: off, or $CHORUS_WYOMING_PORT)")
    serve_cmd.add_argument("--wyoming-zeroconf", nargs="?", const="chorus", metavar="NAME",
                           help="announce the Wyoming server by zeroconf (_wyoming._tcp.local.) as NAME "
                                "(default NAME: chorus; or $CHORUS_WYOMING_ZEROCONF)")
    dirs(serve_cmd)
    serve_cmd.set_defaults(func=serve)

    say_cmd = command(
        "say", "speak TEXT into an audio file, without a server",
        "Synthesise a short text into an audio file, in this process (no server needed).",
        'chorus say "Hello there." -o hello.mp3 --speed 1.2',
    )
    say_cmd.add_argument("text", metavar="TEXT", help="what to say (quote it)")
    voice_options(say_cmd, "speech.wav")
    say_cmd.set_defaults(func=say)

    synth_cmd = command(
        "synth", "speak a long text file (a chapter, a book) into an audio file, with progress",
        "Synthesise a text file of any length into one audio file. The text is cut into "
        "sentence-sized chunks and spoken one after another; a progress bar shows the chunks "
        "done, the seconds of audio made and the speed as a multiple of real time.",
        "chorus synth --file book.txt -o book.mp3",
    )
    synth_cmd.add_argument("--file", "-f", required=True, metavar="TEXT_FILE",
                           help="UTF-8 text file to read, or - for standard input")
    voice_options(synth_cmd, "speech.mp3")
    synth_cmd.set_defaults(func=synth)

    models_cmd = commands.add_parser("models", help="inspect the models the configs describe")
    models_sub = models_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(sub, name: str, func, summary: str, description: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=summary, description=description)
        dirs(cmd)
        cmd.set_defaults(func=func)
        return cmd

    action(
        models_sub, "list", models_list,
        "list every config and whether the files it names are in the models directory",
        "List every model config with its backend and the files it names "
        "(parameters.model, tts.vall-e.audio_path), and whether each is present in the models "
        "directory.",
    )
    pull_cmd = action(
        models_sub, "pull", models_pull,
        "download a model's weights (the Hugging Face hub; Kokoro's release) into the models directory",
        "Download what NAME needs into the models directory, with a progress bar: "
        "a config name (its parameters.model), a Piper voice file such as "
        "en_US-lessac-medium.onnx (from rhasspy/piper-voices), or a hub id such as "
        "suno/bark-small; kokoro fetches Kokoro's kokoro-v1.0.onnx and voices-v1.0.bin from "
        "kokoro-onnx's release. For Modal, upload the directory afterwards: "
        "modal volume put chorus-models models/ /",
    )
    pull_cmd.add_argument("name", metavar="NAME", help="config name, Piper voice file or hub id")

    configs_cmd = commands.add_parser("configs", help="validate the model configs")
    configs_sub = configs_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    action(
        configs_sub, "check", configs_check,
        "validate every config; name the file and field at fault; exit 1 on any problem",
        "Validate every *.yaml config in the configs directory the way the server "
        "does at start-up, report each file as ok or FAIL with the field at fault, and exit 1 if "
        "any config is invalid (use it in CI before deploying).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ChorusError, UnsafePathError, SettingsError) as exc:
        print(f"chorus: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
