"""Prompted segmentation in batches (issue 15, item 4): objects go to the prompt decoder ``batch_size`` at a
time, and the result is the one of decoding every object at once, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from usam_bioimageio.io.overlay import masks_to_labels
from usam_bioimageio.io.prompt_files import ObjectPrompt
from usam_bioimageio.prompting.predict import (
    DEFAULT_BATCH_SIZE,
    label_objects,
    segment_from_prompts,
    segment_objects,
)


class CountingDecoder:
    """Wraps the prompt decoder's runner and records the number of objects of each call."""

    def __init__(self, runner):
        self.runner, self.package, self.input_names = runner, runner.package, runner.input_names
        self.sizes = []

    def __call__(self, **inputs):
        self.sizes.append(len(inputs["point_coords"]))
        return self.runner(**inputs)


class BoxDecoder:
    """A prompt decoder stand-in that costs nothing: each object's logits are +1 inside its box (the last two
    prompt points, in original pixels) and -1 elsewhere, so overlapping boxes give overlapping masks."""

    def __init__(self, runner):
        self.package, self.input_names = runner.package, runner.input_names
        self.sizes = []

    def __call__(self, *, point_coords, orig_im_size, **inputs):
        self.sizes.append(len(point_coords))
        low = np.full((len(point_coords), 4, 256, 256), -1.0, np.float32)
        # the low-res frame is the image's longest side scaled to 256
        for i, ((x0, y0), (x1, y1)) in enumerate(point_coords[:, -2:] * (256 / orig_im_size.max())):
            low[i, :, int(y0):int(y1) + 1, int(x0):int(x1) + 1] = 1.0
        return {"iou_predictions": np.ones((len(point_coords), 4), np.float32), "low_res_masks": low}


def _with_decoder(model, decoder):
    original = model.runner("prompt_decoder")
    model._runners["prompt_decoder"] = decoder(original)
    return original


def _mixed_objects(model, embeddings):
    """Objects of five prompt signatures, interleaved so that the decoding order (by signature) is not the
    input order, overlapping so that the drawing order matters."""
    prior = segment_from_prompts(model, embeddings, boxes=np.array([[40.0, 40, 160, 150]])).low_res_logits[0, 0]
    return [
        ObjectPrompt(box=np.array([30.0, 30, 150, 140])),
        ObjectPrompt(points=np.array([[100.0, 90]]), point_labels=np.array([1])),
        ObjectPrompt(points=np.array([[60.0, 200], [10, 10]]), point_labels=np.array([1, 0]),
                     box=np.array([20.0, 150, 140, 250])),
        ObjectPrompt(box=np.array([80.0, 60, 230, 200])),
        ObjectPrompt(mask=prior, box=np.array([40.0, 40, 160, 150])),
        ObjectPrompt(points=np.array([[120.0, 120]]), point_labels=np.array([1])),
        ObjectPrompt(box=np.array([0.0, 0, 255, 255])),
        ObjectPrompt(points=np.array([[200.0, 60], [180, 80]]), point_labels=np.array([1, 1]),
                     box=np.array([150.0, 20, 250, 120])),
        ObjectPrompt(mask=prior),
        ObjectPrompt(box=np.array([100.0, 100, 180, 180])),
        ObjectPrompt(points=np.array([[30.0, 220]]), point_labels=np.array([1])),
    ]


def test_batched_labels_equal_unbatched_for_mixed_prompts(model, embeddings):
    objects = _mixed_objects(model, embeddings)
    n = len(objects)
    original = _with_decoder(model, CountingDecoder)
    try:
        masks = segment_objects(model, embeddings, objects, batch_size=n)  # every group in one call: as before
        expected = masks_to_labels(masks)
        for batch_size in (1, 3, n):
            model._runners["prompt_decoder"].sizes.clear()
            assert np.array_equal(segment_objects(model, embeddings, objects, batch_size=batch_size), masks)
            got = label_objects(model, embeddings, objects, batch_size=batch_size)
            assert got.dtype == np.uint32 and got.shape == embeddings.original_shape
            assert np.array_equal(got, expected), batch_size
            # a lone object of a larger group is decoded beside a copy of itself (predict's module doc)
            assert max(model._runners["prompt_decoder"].sizes) <= max(batch_size, 2)
        assert label_objects(model, embeddings, objects).dtype == np.uint32  # the default batch size
    finally:
        model._runners["prompt_decoder"] = original
    # the test shows the overlap rule: objects overlap, and drawing them in decoding order would differ
    assert (masks.sum(axis=0) > 1).any()
    by_signature = sorted(range(n), key=lambda i: list(dict.fromkeys(o.signature() for o in objects))
                          .index(objects[i].signature()))
    drawn = np.zeros_like(expected)
    for i in by_signature:
        drawn[masks[i]] = i + 1
    assert not np.array_equal(drawn, expected)


def test_segment_from_prompts_is_the_same_in_any_batch_size(model, embeddings):
    rng = np.random.default_rng(0)
    x0, y0 = rng.uniform(0, 180, (2, 9))
    boxes = np.stack([x0, y0, x0 + rng.uniform(5, 75, 9), y0 + rng.uniform(5, 75, 9)], axis=1)
    points = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)[:, None]
    prompts = dict(boxes=boxes, points=points, point_labels=np.ones((9, 1)), multimask_output=True)
    ref = segment_from_prompts(model, embeddings, batch_size=9, **prompts)
    assert ref.masks.shape == (9, 3) + embeddings.original_shape
    for batch_size in (1, 4, 100):
        got = segment_from_prompts(model, embeddings, batch_size=batch_size, **prompts)
        np.testing.assert_array_equal(got.masks, ref.masks)
        np.testing.assert_array_equal(got.scores, ref.scores)
        np.testing.assert_array_equal(got.low_res_logits, ref.low_res_logits)
    with pytest.raises(ValueError, match="batch_size"):
        segment_from_prompts(model, embeddings, boxes=boxes, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        label_objects(model, embeddings, [ObjectPrompt(box=boxes[0])], batch_size=2.5)
    # every object is checked before any is decoded: a bad box among good ones costs no decoder call
    original = _with_decoder(model, CountingDecoder)
    try:
        bad = [ObjectPrompt(box=b) for b in boxes] + [ObjectPrompt(box=np.array([10.0, 10, 400, 20]))]
        with pytest.raises(ValueError, match="outside the image"):
            label_objects(model, embeddings, bad, batch_size=2)
        assert model._runners["prompt_decoder"].sizes == []
    finally:
        model._runners["prompt_decoder"] = original


def test_500_boxes_go_to_the_decoder_in_batches(model, embeddings):
    """500 overlapping boxes (a stand-in decoder: the point is the batching and the drawing, not SAM)."""
    rng = np.random.default_rng(1)
    x0, y0 = rng.uniform(0, 230, (2, 500))
    boxes = np.stack([x0, y0, np.minimum(x0 + rng.uniform(2, 40, 500), 256),
                      np.minimum(y0 + rng.uniform(2, 40, 500), 256)], axis=1)
    objects = [ObjectPrompt(box=b) for b in boxes]
    objects[::7] = [ObjectPrompt(points=[[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]], point_labels=[1], box=b)
                    for b in boxes[::7]]  # a second signature, interleaved
    original = _with_decoder(model, BoxDecoder)
    try:
        labels = label_objects(model, embeddings, objects)
        sizes = model._runners["prompt_decoder"].sizes
        assert max(sizes) == DEFAULT_BATCH_SIZE and sum(sizes) == 500
        expected = masks_to_labels(segment_objects(model, embeddings, objects, batch_size=500))
    finally:
        model._runners["prompt_decoder"] = original
    assert np.array_equal(labels, expected)
    assert len(np.unique(labels)) - 1 > 100  # many objects survive in the label image


def test_many_boxes_with_the_real_decoder(model, embeddings):
    """The real decoder on 120 boxes of a small image (about 0.1 s per object here, hence not 500): calls of
    the default batch size, every label a valid object, the last object drawn over the others."""
    rng = np.random.default_rng(2)
    x0, y0 = rng.uniform(0, 220, (2, 120))
    boxes = np.stack([x0, y0, x0 + rng.uniform(4, 36, 120), y0 + rng.uniform(4, 36, 120)], axis=1)
    original = _with_decoder(model, CountingDecoder)
    try:
        labels = label_objects(model, embeddings, [ObjectPrompt(box=b) for b in boxes])
        sizes = model._runners["prompt_decoder"].sizes
    finally:
        model._runners["prompt_decoder"] = original
    assert sizes == [DEFAULT_BATCH_SIZE] * (120 // DEFAULT_BATCH_SIZE) + [120 % DEFAULT_BATCH_SIZE]
    assert labels.shape == embeddings.original_shape and 0 < labels.max() <= 120
    last = segment_from_prompts(model, embeddings, boxes=boxes[-1]).masks[0, 0]
    assert last.any() and np.all(labels[last] == 120)
