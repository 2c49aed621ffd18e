"""The playground: a page to try every served model and voice from a browser.

Plain files under router/static, served as they are: no build step, and nothing fetched from
another host, so the page works on an offline machine.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only the files that ship with the page are served: a name from the URL never reaches the disk.
_FILES = {path.name: path for path in STATIC_DIR.iterdir() if path.suffix in _MEDIA_TYPES}

router = APIRouter(tags=["Playground"])


def _file(name: str) -> FileResponse:
    path = _FILES[name]
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix])


@router.get("/", include_in_schema=False)
@router.get("/playground", summary="The playground page")
async def playground() -> FileResponse:
    return _file("playground.html")


@router.get("/playground/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    if name not in _FILES:
        raise HTTPException(404, f"no playground file named '{name}'")
    return _file(name)
