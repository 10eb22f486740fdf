"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol, Release 1): VT <message> FS CR.

Framing only: this module knows nothing of HL7 fields. `FrameReader` is a push parser
(bytes in, complete frames out) so the asyncio listener and the tests drive it the same way.
A sender may pipeline several frames in one TCP write or split one frame over many; both
work. A frame over the size cap is still read to its end (so the sender's next message is
not lost in the middle of this one): its first `max_bytes` bytes are kept, the SHA-256 is
taken over every byte, and the frame is marked `oversize`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

START_BLOCK = b"\x0b"  # VT
END_BLOCK = b"\x1c"  # FS
CARRIAGE_RETURN = b"\x0d"
END_OF_FRAME = END_BLOCK + CARRIAGE_RETURN
# Bytes a sender may leave between frames without breaking the stream (stray CR/LF).
_INTER_FRAME_NOISE = b"\r\n\t "


class FramingError(ValueError):
    """The byte stream is not MLLP: data outside a frame. The connection must close."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete frame's content (without VT / FS CR).

    `payload` is the whole message, or only its first bytes when `oversize`; `size` and
    `sha256` always describe the complete content as received.
    """

    payload: bytes
    size: int
    sha256: str
    oversize: bool = False


def frame_message(payload: bytes) -> bytes:
    """Wrap one message for the wire."""
    return START_BLOCK + payload + END_OF_FRAME


class FrameReader:
    """Split an MLLP byte stream into frames, with a per-frame size cap."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._in_frame = False
        # Oversize state: the kept head, the running hash and size of a frame being skipped.
        self._skipping = False
        self._head = b""
        self._hash = hashlib.sha256()
        self._size = 0
        self.error: FramingError | None = None

    @property
    def idle(self) -> bool:
        """True between frames (nothing of a started frame is pending)."""
        return not self._in_frame and not self._buf.strip(_INTER_FRAME_NOISE)

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next bytes of the stream; return the frames they complete.

        Bytes outside a frame set `error` (a FramingError): the frames completed before them
        are still returned, so each gets its acknowledgement before the connection closes.
        """
        if self.error is not None:
            return []
        self._buf += data
        frames: list[Frame] = []
        while True:
            try:
                if not self._in_frame and not self._start_frame():
                    return frames
            except FramingError as exc:
                self.error = exc
                return frames
            frame = self._take_frame()
            if frame is None:
                return frames
            frames.append(frame)

    def _start_frame(self) -> bool:
        start = self._buf.find(START_BLOCK)
        noise = self._buf if start < 0 else self._buf[:start]
        if noise.strip(_INTER_FRAME_NOISE):
            self._buf.clear()
            raise FramingError("data outside an MLLP frame (no start block)")
        if start < 0:
            self._buf.clear()
            return False
        del self._buf[: start + 1]
        self._in_frame = True
        return True

    def _take_frame(self) -> Frame | None:
        end = self._buf.find(END_OF_FRAME)
        if end < 0:
            self._spill_if_oversize()
            return None
        content = bytes(self._buf[:end])
        del self._buf[: end + len(END_OF_FRAME)]
        self._in_frame = False
        if self._skipping:
            return self._finish_oversize(content)
        if len(content) > self.max_bytes:
            return Frame(
                content[: self.max_bytes],
                len(content),
                hashlib.sha256(content).hexdigest(),
                oversize=True,
            )
        return Frame(content, len(content), hashlib.sha256(content).hexdigest())

    def _spill_if_oversize(self) -> None:
        # Keep one byte back: it may be the FS of an FS CR split across reads.
        keep = 1 if self._buf.endswith(END_BLOCK) else 0
        if self._skipping or len(self._buf) - keep > self.max_bytes:
            chunk = bytes(self._buf[: len(self._buf) - keep])
            if not self._skipping:
                self._skipping, self._head = True, chunk[: self.max_bytes]
                self._hash, self._size = hashlib.sha256(), 0
            self._hash.update(chunk)
            self._size += len(chunk)
            del self._buf[: len(chunk)]

    def _finish_oversize(self, tail: bytes) -> Frame:
        self._hash.update(tail)
        size = self._size + len(tail)
        frame = Frame(self._head, size, self._hash.hexdigest(), oversize=True)
        self._skipping, self._head, self._size = False, b"", 0
        return frame
