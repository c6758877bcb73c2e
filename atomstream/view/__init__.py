"""``atomstream view``: a live page in the browser of what the service publishes.

``state`` holds what the page shows (the latest frame's maps and defects, class fractions over time, throughput
and latency), fed by a subscriber thread; ``snapshot`` packs it into one compact binary message; ``app`` serves the
page, the snapshot over HTTP and its updates over a websocket (Starlette on uvicorn). Everything the browser loads
comes from ``static/`` in this package: no CDN, no internet.
"""

from atomstream.view.snapshot import decode_snapshot, encode_snapshot
from atomstream.view.state import ViewState

__all__ = ["ViewState", "decode_snapshot", "encode_snapshot"]
