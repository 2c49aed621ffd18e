"""The walk of one OpenAI request's body through the router: which modules it passes through,
and how often it comes back to one it had left.

    python bench/request_walk.py [--text "..."] [--show]

Serves the app in this process (local mode, the bundled Piper voice) and sends one
`POST /v1/audio/speech` through httpx's ASGI transport, with a profiler hook (sys.setprofile)
that notes every Python function of router/ and functions/ the first time it is called on the
event loop's thread, from the route's handler to the response's last bytes (each function once,
as a reader follows the path: not each resumption of a generator for each piece of audio).
Consecutive functions of one module are one stay; it prints the stays, the modules, how many times each module was entered and how many
times the walk came back to a module it had left. Calls made in worker threads (the encoder's,
the backend's synthesis) are not on the walk: they are the modules' own work, not its path.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from router.app import create_app  # noqa: E402
from router.settings import Settings  # noqa: E402
from tests._live import piper_setup  # noqa: E402  (the tests' configs and models directories)

TEXT = "Hello there. This is the second sentence. And a third one closes the text."
PACKAGES = (str(ROOT / "router"), str(ROOT / "functions"))


def walk(text: str) -> list[tuple[str, str]]:
    root = Path(tempfile.mkdtemp(prefix="chorus-walk-"))
    configs, models = piper_setup(root)
    app = create_app(Settings(configs_dir=configs, models_dir=models))
    calls: list[tuple[str, str]] = []

    seen: set[object] = set()

    def note(frame, event, arg):  # noqa: ARG001 - the profiler's signature
        # Each function once, where it is first called: the path a reader follows, not every
        # resumption of a generator per piece of audio.
        if event == "call" and frame.f_code not in seen:
            filename = frame.f_code.co_filename
            if filename.startswith(PACKAGES):
                seen.add(frame.f_code)
                calls.append((str(Path(filename).relative_to(ROOT)), frame.f_code.co_qualname))

    async def request() -> None:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://chorus") as client:
            body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}
            await client.post("/v1/audio/speech", json=body)  # the model loaded, outside the walk
            sys.setprofile(note)
            try:
                response = await client.post("/v1/audio/speech", json=body)
            finally:
                sys.setprofile(None)
            assert response.status_code == 200, response.text

    asyncio.run(request())
    # From the route's handler on: the app's middleware and routing come before it.
    start = next(i for i, (module, _) in enumerate(calls) if module.startswith("router/api/openai"))
    return calls[start:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--show", action="store_true", help="print every stay")
    args = parser.parse_args()
    calls = walk(args.text)
    stays: list[tuple[str, list[str]]] = []
    for module, function in calls:
        if stays and stays[-1][0] == module:
            stays[-1][1].append(function)
        else:
            stays.append((module, [function]))
    entered = Counter(module for module, _ in stays)
    returns = len(stays) - len(entered)
    if args.show:
        for number, (module, functions) in enumerate(stays, 1):
            print(f"{number:3d} {module}: {', '.join(functions)}")
    print(f"{len(calls)} functions, {len(stays)} stays in {len(entered)} modules, {returns} returns to a module "
          "already left")
    for module, times in entered.most_common():
        print(f"  {times:3d}  {module}")


if __name__ == "__main__":
    main()
