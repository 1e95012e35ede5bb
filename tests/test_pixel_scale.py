"""usam_bioimageio.runtime.pixel_scale: the resizes that run a model at another pixel scale (`usam ais --scale`),
against torch's bilinear interpolation (``align_corners=False``, no antialiasing), and their input checks. The
model paths (AIS maps at a scale, the CLI) are tested on the 256 family in tests/test_image_size.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usam_bioimageio.runtime.pixel_scale import check_scale, resize_maps, scale_image, scaled_shape


def _torch_resize(chw: np.ndarray, shape) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(chw, np.float32))[None]
    return F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False, antialias=False)[0].numpy()


@pytest.mark.parametrize("scale", [2.0, 1.5, 3.0, 0.5])
def test_images_resize_as_torch_bilinear(scale):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 4000, (37, 52)).astype(np.uint16)
    rgb = rng.integers(0, 256, (37, 52, 3)).astype(np.uint8)
    shape = scaled_shape(gray.shape, scale)
    assert shape == (int(round(37 * scale)), int(round(52 * scale)))
    out = scale_image(gray, scale)
    assert out.dtype == np.float32 and out.shape == shape
    if scale >= 1:  # enlarging: every output pixel interpolates two neighbours, as torch does
        np.testing.assert_allclose(out, _torch_resize(gray[None], shape)[0], atol=0.02)  # float32 rounding of the coordinates
        np.testing.assert_allclose(scale_image(rgb, scale), _torch_resize(rgb.transpose(2, 0, 1), shape)
                                   .transpose(1, 2, 0), atol=2e-3)
    else:
        assert out.min() >= gray.min() and out.max() <= gray.max()


def test_maps_resize_back_as_torch_bilinear():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 80, 110)).astype(np.float32)
    back = resize_maps(maps, (40, 55))
    assert back.shape == (3, 40, 55) and back.dtype == np.float32
    np.testing.assert_allclose(back, _torch_resize(maps, (40, 55)), atol=1e-5)
    np.testing.assert_array_equal(resize_maps(maps, (80, 110, 3)), maps)  # the image's shape: unchanged


def test_scale_one_keeps_the_image_and_bad_scales_are_one_line_errors():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(scale_image(image, 1), image)
    for bad in (0, -1, float("nan"), float("inf"), 9):
        with pytest.raises(ValueError, match="scale must be > 0 and at most 8") as err:
            check_scale(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="expected a 2D image"):
        scale_image(np.zeros((2, 3, 4, 5)), 2)
    with pytest.raises(ValueError, match="expected maps"):
        resize_maps(np.zeros((4, 5)), (2, 2))


def test_evaluation_scales_ais_only():
    from usam_bioimageio.evaluation.automatic import evaluate_automatic

    with pytest.raises(ValueError, match="scale is for mode 'ais', not 'amg'"):
        evaluate_automatic(None, [], [], mode="amg", scale=2)
