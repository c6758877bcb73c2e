"""The web side of ``atomstream view``: a Starlette app around a ``ViewState``.

Routes:

* ``/`` — the page (``static/index.html``); ``/static/…`` — its script and style, from this package only;
* ``/snapshot`` — the current state as one binary message (``atomstream.view.snapshot``): the page draws it at once
  on load, so a reader (or a headless browser) sees the maps without waiting for the next update;
* ``/ws`` — a websocket that pushes a new snapshot whenever the state changes, at most ``max_fps`` times a second
  (a fast service publishes hundreds of frames a second; a browser needs a few);
* ``/state`` — counts as JSON; ``?min_frames=N&connected=1&timeout=S`` waits until N frames are complete (maps and
  defects) and a heartbeat arrived (a readiness handshake for scripts and tests).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from atomstream.view.state import ViewState

__all__ = ["STATIC", "create_app"]

STATIC = Path(__file__).with_name("static")
_MAX_WAIT_S = 60.0


def create_app(state: ViewState, *, max_fps: float = 5.0) -> Starlette:
    """The app serving ``state``; the caller owns the subscriber thread that fills it."""
    if max_fps <= 0:
        raise ValueError(f"max_fps must be positive, got {max_fps}")
    period = 1.0 / max_fps

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def snapshot(request: Request) -> Response:
        data = await anyio.to_thread.run_sync(state.snapshot)
        return Response(data, media_type="application/octet-stream", headers={"Cache-Control": "no-store"})

    async def state_json(request: Request) -> Response:
        q = request.query_params
        try:
            min_frames = int(q.get("min_frames", "0"))
            timeout = min(float(q.get("timeout", "0")), _MAX_WAIT_S)
        except ValueError:
            return JSONResponse({"detail": "min_frames must be an integer and timeout a number"}, status_code=400)
        connected = q.get("connected", "0") not in ("0", "false", "")
        summary = await anyio.to_thread.run_sync(
            lambda: state.wait_for(min_frames=min_frames, connected=connected, timeout=timeout)
        )
        return JSONResponse(summary)

    async def updates(ws: WebSocket) -> None:
        await ws.accept()
        version = -1
        try:
            while True:
                version = await anyio.to_thread.run_sync(state.wait_changed, version, 1.0)
                await ws.send_bytes(await anyio.to_thread.run_sync(state.snapshot))
                await asyncio.sleep(period)
        except (WebSocketDisconnect, RuntimeError):
            return  # the page was closed or reloaded

    return Starlette(
        routes=[
            Route("/", index),
            Route("/snapshot", snapshot),
            Route("/state", state_json),
            WebSocketRoute("/ws", updates),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
