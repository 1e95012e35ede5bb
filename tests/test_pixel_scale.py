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


def test_checkpoints_carry_the_pixel_scale(tmp_path):
    """Every way of saving a checkpoint records a pixel scale other than 1 (and nothing for 1, so µSAM's layout
    stays as it is); loading reads it back, a compact file included; a bad recorded value is a one-line error."""
    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training.checkpoints import (PIXEL_SCALE_KEY, load_checkpoint, save_checkpoint,
                                                      save_compact_checkpoint, save_training_checkpoint)

    state = seeded_sam("vit_t", seed=0, image_size=256).state_dict()
    for save in (save_checkpoint, save_compact_checkpoint, save_training_checkpoint):
        plain = save(tmp_path / f"{save.__name__}_1.pt", sam_state=state, image_size=256)
        assert PIXEL_SCALE_KEY not in torch.load(plain, weights_only=True)
        assert load_checkpoint(plain).pixel_scale == 1.0
        scaled = save(tmp_path / f"{save.__name__}_2.pt", sam_state=state, image_size=256, pixel_scale=2)
        assert torch.load(scaled, weights_only=True)[PIXEL_SCALE_KEY] == 2.0
        ckpt = load_checkpoint(scaled)
        assert ckpt.pixel_scale == 2.0 and ckpt.image_size == 256
    with pytest.raises(ValueError, match="scale must be > 0"):
        save_checkpoint(tmp_path / "never.pt", sam_state=state, image_size=256, pixel_scale=0)
    assert not (tmp_path / "never.pt").exists()
    obj = torch.load(scaled, weights_only=True)
    obj[PIXEL_SCALE_KEY] = 20.0
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"'pixel_scale': scale must be > 0 and at most 8, got 20") as err:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("scale", [2.0, 1.5, 3.0, 0.7, 2.37])
def test_masks_shrink_as_the_maps_resize(scale):
    """prompting.scaled.shrink_mask (only the rows and columns an object reaches): the enlarged mask resized to the
    image as resize_maps resizes AIS maps, a pixel in the object where that is >= 0.5; objects at every border."""
    from usam_bioimageio.prompting.scaled import shrink_mask

    rng = np.random.default_rng(int(scale * 100))
    for _ in range(30):
        shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        big = scaled_shape(shape, scale)
        mask = np.zeros(big, bool)
        y0, x0 = rng.integers(-10, big[0]), rng.integers(-10, big[1])
        mask[max(y0, 0):y0 + rng.integers(11, 40), max(x0, 0):x0 + rng.integers(11, 40)] = True
        mask &= rng.random(big) < 0.8
        ref = resize_maps(mask[None].astype(np.float32), shape)[0]
        got = shrink_mask(mask, shape)
        assert got.shape == shape and got.dtype == bool
        # a pixel exactly at 0.5 may round either way in float32
        assert not ((got != (ref >= 0.5)) & (np.abs(ref - 0.5) > 1e-5)).any()
    assert not shrink_mask(np.zeros((20, 30), bool), (10, 15)).any()
    block = np.zeros((20, 30), bool)
    block[4:8, 6:12] = True  # at scale 2: exactly the pixels 2..3 x 3..5
    expected = np.zeros((10, 15), bool)
    expected[2:4, 3:6] = True
    np.testing.assert_array_equal(shrink_mask(block, (10, 15)), expected)
