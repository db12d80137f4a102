"""Compressed-image header peek (width, height from a JPEG/PNG header, no decoding) on NON-SQUARE forged headers.

A square forged header cannot tell width from height, nor the larger side from the smaller: every header here is
far longer on one side than the other, in both orientations, and the expected answers are the forged numbers.
The function moves to a ROS-free codec module; until then it is imported from the frame processor.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ros2_stream4d.ros.frame_processor import compressed_image_size

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = [(9000, 100), (100, 9000), (70000 - 1, 3), (3, 65535)]  # (width, height)


def forged_png(width: int, height: int) -> bytes:
    """PNG signature + IHDR chunk (length, type, width, height, depth, colour, ...; the CRC is not checked)."""
    ihdr = struct.pack(">II5B", width, height, 8, 2, 0, 0, 0)
    return PNG_MAGIC + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + b"\x00\x00\x00\x00"


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def forged_jpeg(width: int, height: int, sof: int = 0xC0, before_sof: bytes = b"") -> bytes:
    """SOI, a JFIF APP0 segment, optional extra bytes, then a start-of-frame segment with the forged size. Nothing
    after it: a decoder would fail, only the header peek can answer."""
    app0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    sof_payload = struct.pack(">BHHB", 8, height, width, 3) + bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    return b"\xff\xd8" + app0 + before_sof + segment(sof, sof_payload)


@pytest.mark.parametrize("width,height", [s for s in SHAPES if max(s) <= 65535])
def test_jpeg_header_gives_width_then_height(width, height):
    assert compressed_image_size(forged_jpeg(width, height)) == (width, height)


@pytest.mark.parametrize("width,height", SHAPES)
def test_png_header_gives_width_then_height(width, height):
    assert compressed_image_size(forged_png(width, height)) == (width, height)
    # image_transport's compressedDepth: a 12-byte config header before the PNG
    assert compressed_image_size(bytes(12) + forged_png(width, height)) == (width, height)
    # the message field may be a list or a numpy array rather than bytes
    assert compressed_image_size(list(forged_png(width, height))) == (width, height)
    assert compressed_image_size(np.frombuffer(forged_png(width, height), np.uint8)) == (width, height)


@pytest.mark.parametrize("sof", [0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCF])
def test_every_start_of_frame_kind_is_read(sof):
    assert compressed_image_size(forged_jpeg(9000, 100, sof=sof)) == (9000, 100)


@pytest.mark.parametrize("not_sof", [0xC4, 0xC8, 0xCC])  # DHT, JPG, DAC share the range but carry no size
def test_segments_in_the_sof_range_that_are_not_frames_are_skipped(not_sof):
    before = segment(not_sof, struct.pack(">BHHB", 8, 7, 7, 3))  # would read as 7x7 if taken for a frame header
    assert compressed_image_size(forged_jpeg(100, 9000, before_sof=before)) == (100, 9000)


def test_segments_before_the_frame_header_are_skipped_by_their_length():
    """A quantisation table, a comment holding bytes that look like a SOF marker, fill bytes and a restart marker:
    the peek must step over each by its length and find the real frame header."""
    dqt = segment(0xDB, bytes(65))
    fake_sof_in_comment = segment(0xFE, b"\xff\xc0\x00\x11\x08\x00\x07\x00\x07\x03")
    fill_and_rst = b"\xff\xff\xff\xd0"
    data = forged_jpeg(9000, 100, before_sof=dqt + fake_sof_in_comment + fill_and_rst)
    assert compressed_image_size(data) == (9000, 100)


def test_headers_that_cannot_tell_give_none():
    assert compressed_image_size(b"") is None
    assert compressed_image_size(b"\xff\xd8") is None  # SOI only
    assert compressed_image_size(forged_jpeg(9000, 100)[:-12]) is None  # cut inside the frame header
    assert compressed_image_size(b"\xff\xd8" + segment(0xDA, bytes(10)) + forged_jpeg(9000, 100)[2:]) is None
    assert compressed_image_size(b"\xff\xd8\xff\xd9") is None  # end of image before any frame header
    assert compressed_image_size(b"\xff\xd8\x00\xc0") is None  # not a marker
    assert compressed_image_size(b"\xff\xd8\xff\xe0\x00\x01" + bytes(20)) is None  # segment length below 2
    assert compressed_image_size(forged_png(9000, 100)[:20]) is None  # truncated IHDR
    png = bytearray(forged_png(9000, 100))
    png[12:16] = b"IDAT"
    assert compressed_image_size(bytes(png)) is None  # the first chunk must be IHDR
    assert compressed_image_size(b"GIF89a" + bytes(20)) is None
    assert compressed_image_size(None) is None  # never raises


def test_decode_refuses_an_oversized_header_on_its_larger_side():
    """FrameProcessor.decode refuses a compressed image from its header when its LARGER side is over
    max_image_side, before decoding: the reason is "image size", not the decoder's "image corrupt" (the forged
    data has no pixels to decode). A check on the smaller side would let both orientations through."""
    pytest.importorskip("sensor_msgs")
    from sensor_msgs.msg import CompressedImage

    from ros2_stream4d.ros.config import make_config
    from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings

    class Log:
        def __init__(self):
            self.lines = []

        def warning(self, msg):
            self.lines.append(msg)

        info = error = warning

    cfg = make_config({"max_image_side": 4096})
    for data, fmt in [(forged_jpeg(9000, 100), "jpeg"), (forged_jpeg(100, 9000), "jpeg"),
                      (forged_png(9000, 100), "png"), (forged_png(100, 9000), "png")]:
        warnings = RateLimitedWarnings(Log())
        proc = FrameProcessor(cfg, pipeline=None, tf=None, warnings=warnings, logger=Log())
        msg = CompressedImage(format=fmt, data=data)
        msg.header.stamp.sec = 1
        assert proc.decode(msg) is None
        assert warnings.counts == {"image size": 1}, (compressed_image_size(data), warnings.counts)
    # a header within the limit goes on to the decoder (which then finds no pixels)
    warnings = RateLimitedWarnings(Log())
    proc = FrameProcessor(cfg, pipeline=None, tf=None, warnings=warnings, logger=Log())
    msg = CompressedImage(format="jpeg", data=forged_jpeg(4096, 100))
    msg.header.stamp.sec = 1
    assert proc.decode(msg) is None and "image size" not in warnings.counts
