"""The invisible DWT-DCT watermark CompVis puts on every sample ("StableDiffusionV1"),
through the ``invisible-watermark`` package (imported only when used).

The encoder cannot carry the mark in images of 256x256 pixels or fewer (it refuses, or the
mark decodes as garbage): ``can_watermark`` says so beforehand, and such images are written
without a mark (their metadata says so).
"""
import numpy as np
from PIL import Image

WATERMARK = "StableDiffusionV1"
MIN_PIXELS = 256 * 256   # strictly more are needed


def can_watermark(width, height):
    return width * height > MIN_PIXELS and min(width, height) >= 64


def _bgr(image):
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def read_watermark(image, length=len(WATERMARK)):
    """The mark decoded from a PIL image (a string, possibly garbage when there is none)."""
    from imwatermark import WatermarkDecoder
    raw = WatermarkDecoder("bytes", 8 * length).decode(_bgr(image), "dwtDct")
    return bytes(raw).decode("utf-8", errors="replace")


def put_watermark(image, text=WATERMARK):
    """(image, note): the marked image and ``text`` when the mark went in and reads back;
    the marked image and a note saying so when it went in but does not read back (large
    saturated or flat areas can defeat DWT-DCT); the image unchanged and "none (...)" when
    the image is too small to carry it."""
    if not can_watermark(*image.size):
        return image, "none (image too small to carry it)"
    from imwatermark import WatermarkEncoder
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    try:
        marked = Image.fromarray(np.ascontiguousarray(encoder.encode(_bgr(image), "dwtDct")[:, :, ::-1]))
    except RuntimeError as e:
        return image, f"none (encoder refused: {e})"
    if read_watermark(marked, len(text.encode("utf-8"))) == text:
        return marked, text
    return marked, f"{text} (embedded, but does not read back from this image)"
