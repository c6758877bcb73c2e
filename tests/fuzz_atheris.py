"""Coverage-guided fuzzing of the wire decoder with atheris (libFuzzer); a script, not a pytest test.

The invariant is the service's first line of defence: ``decode``, ``decode_published`` and ``decode_control`` either
return a message or raise ``ProtocolError`` with a known reason — never anything else (an exception escaping
``decode`` kills the service's I/O thread) — and an accepted frame's array has exactly the declared size. The fuzzer
input is split into the parts of a multipart message, so buffer counts and sizes are explored too; a seed corpus of
valid frames of every dtype is built in memory.

    pip install atheris
    python tests/fuzz_atheris.py -atheris_runs=200000            # a short run; add -max_total_time=600 to go longer
    python tests/fuzz_atheris.py --known-bugs -atheris_runs=...    # also fail on RecursionError (deep JSON nesting)
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import atheris
import numpy as np

with atheris.instrument_imports(include=["streamer", "json"]):  # coverage feedback from the decoder (and JSON)
    from streamer.wire.protocol import (
        REASONS,
        SUPPORTED_DTYPES,
        ProtocolError,
        decode,
        decode_control,
        decode_published,
    )

MAX_FRAME_BYTES = 1 << 20
SEPARATOR = b"\x00|\x00"  # splits the fuzzer's input into message parts
KNOWN_BUGS: tuple[type[BaseException], ...] = (RecursionError,)  # reported: deep JSON nesting, see the fuzz tests


def seed_corpus() -> list[bytes]:
    """Valid frames of every dtype, joined the way ``one_input`` splits them."""
    from streamer.wire.protocol import encode, frame_message

    seeds = []
    for dtype in SUPPORTED_DTYPES:
        array = (np.arange(12) % 7).astype(dtype).reshape(3, 4)
        seeds.append(SEPARATOR.join(bytes(part) for part in encode(frame_message("s", 1, array), array)))
    return seeds


def one_input(data: bytes) -> None:
    frames = data.split(SEPARATOR)
    try:
        msg, arrays = decode(frames, max_frame_bytes=MAX_FRAME_BYTES)
    except ProtocolError as exc:
        if exc.reason not in REASONS:
            raise AssertionError(f"unknown reason {exc.reason!r}") from exc
    except KNOWN_BUGS:
        pass
    else:
        if msg.kind == "frame":
            expected = math.prod(msg.shape) * np.dtype(msg.dtype).itemsize
            if arrays[0].nbytes != expected or expected > MAX_FRAME_BYTES:
                raise AssertionError(f"accepted a frame of {arrays[0].nbytes} bytes declaring {expected}")
    for call in (lambda: decode_published([b"maps", *frames]), lambda: decode_control(frames[0])):
        try:
            call()
        except ProtocolError:
            pass
        except KNOWN_BUGS:
            pass


def main() -> None:
    global KNOWN_BUGS
    argv = [a for a in sys.argv if a != "--known-bugs"]
    if len(argv) != len(sys.argv):
        KNOWN_BUGS = ()
    corpus = tempfile.mkdtemp(prefix="atomstream-fuzz-")
    for k, seed in enumerate(seed_corpus()):
        with open(os.path.join(corpus, f"seed{k}"), "wb") as f:
            f.write(seed)
    atheris.Setup([*argv, corpus], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
