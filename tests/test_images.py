"""How final images and previews are written: formats, losslessness, and the settings inside."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import ExifTags, Image

from flux_infer.images import (USER_COMMENT_UNICODE, encode, keep_settings, parameters_of, quick_to_encode,
                               settings_of)

SETTINGS = {"prompt": "un chat « noir » 猫", "seed": 7, "width": 64, "height": 48, "guidance_scale": 3.5,
            "num_inference_steps": 4, "loras": []}
PARAMETERS = "un chat « noir » 猫\nSteps: 4, Sampler: FlowMatchEuler, Guidance: 3.5, Seed: 7, Size: 64x48"


def picture() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return keep_settings(Image.fromarray(pixels), PARAMETERS, SETTINGS)


@pytest.mark.parametrize("image_format", ["png", "webp", "jpeg"])
def test_every_format_keeps_the_settings(image_format):
    written = Image.open(io.BytesIO(encode(picture(), image_format)))
    assert written.format == image_format.upper()
    assert settings_of(written) == SETTINGS
    assert parameters_of(written) == PARAMETERS
    if image_format != "png":
        # UserComment typed UNDEFINED, as EXIF says: readers built on piexif decode only that
        comment = USER_COMMENT_UNICODE + PARAMETERS.encode("utf-16-be")
        assert struct.pack(">HHI", ExifTags.Base.UserComment, 7, len(comment)) in written.info["exif"]


def test_a_final_webp_is_lossless_and_a_preview_quality_webp_is_not():
    image = picture()
    lossless = Image.open(io.BytesIO(encode(image, "webp")))
    np.testing.assert_array_equal(np.asarray(lossless), np.asarray(image))
    lossy = Image.open(io.BytesIO(encode(image, "webp", quality=80)))
    assert not np.array_equal(np.asarray(lossy), np.asarray(image))


def test_gradio_writes_a_final_image_as_encode_does():
    from gradio.processing_utils import encode_pil_to_bytes

    # Gradio's own encoder, as its Image component calls it for /infer's result: the encoding chosen
    # by quick_to_encode, the settings passed on from the image's info.
    assert encode_pil_to_bytes(quick_to_encode(picture()), "webp") == encode(picture(), "webp")
    assert Image.open(io.BytesIO(encode_pil_to_bytes(quick_to_encode(picture()), "png"))).text["flux_infer"] \
        == picture().info["flux_infer"]


def test_an_image_without_settings_has_none():
    image = Image.open(io.BytesIO(encode(Image.new("RGB", (8, 8)), "webp")))
    assert settings_of(image) == {} and parameters_of(image) is None
