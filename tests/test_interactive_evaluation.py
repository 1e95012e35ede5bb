"""µSAM's interactive (iterative prompting) evaluation on our packages."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DSB, dsb_test_ids

from usam_bioimageio.evaluation import interactive as ie
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.evaluation.metrics import mean_segmentation_accuracy
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.prompting.predict import segment_from_prompts
from usam_bioimageio.prompting import iterative as ip


@pytest.fixture(scope="module")
def case(vit_t_family):
    import tifffile

    from usam_bioimageio.io.images import read_image

    sid = dsb_test_ids()[0]
    image = read_image(DSB / "images" / f"{sid}.png")[:160, :200]
    gt = tifffile.imread(DSB / "labels" / f"{sid}.tif")[:160, :200]
    model = SamModel.load(vit_t_family[0])
    return model, image, gt, compute_embeddings(model, image)


def test_rounds_on_the_packages(case):
    model, image, gt, emb = case
    n = len(np.unique(gt)) - 1
    for start in ("box", "point"):
        rounds = ie.interactive_segmentation(model, image, gt, start=start, n_iterations=3, seed=1, embeddings=emb)
        assert len(rounds) == 3
        for k, r in enumerate(rounds):
            n_points = 2 * k + (start == "point")
            assert (r.points is None) == (n_points == 0)
            if n_points:
                assert r.points.shape == (n, n_points, 2) and r.point_labels.shape == (n, n_points)
            assert (r.boxes is None) == (start == "point")
            assert r.labels.shape == gt.shape and 0.0 <= r.msa <= 1.0
            assert r.msa == mean_segmentation_accuracy(r.labels, gt)[0] and r.sa50 >= r.sa75
        again = ie.interactive_segmentation(model, image, gt, start=start, n_iterations=3, seed=1, embeddings=emb)
        assert all(np.array_equal(a.points, b.points) for a, b in zip(rounds[1:], again[1:]))
    # round 0 from boxes: the decoder's single-mask output for the objects' boxes, painted as µSAM does
    first = ie.interactive_segmentation(model, image, gt, start="box", n_iterations=1, embeddings=emb)[0]
    masks = segment_from_prompts(model, emb, boxes=first.boxes).masks[:, 0]
    assert np.array_equal(first.labels, ie._label_image(masks, gt.shape))


def test_known_prompt_sequence_for_a_fixed_seed(case, monkeypatch):
    """With a decoder that predicts nothing, the corrections are re-derived independently: every round a
    positive point in the object and a negative one in its box grown by 3 pixels, drawn in µSAM's order."""
    model, image, gt, emb = case
    monkeypatch.setattr(ie, "_decode", lambda model, emb, shape, scale, points, labels, boxes, multimask, batch:
                        np.zeros((len(boxes) if boxes is not None else len(points),) + gt.shape, bool))
    rounds = ie.interactive_segmentation(model, image, gt, start="box", n_iterations=4, seed=7, embeddings=emb)
    ids = np.unique(gt)[1:]
    masks = ip.object_masks(gt, ids)
    rng = np.random.default_rng(7)
    expected = [ip.corrective_points(masks, np.zeros_like(masks), rng)[0] for _ in range(3)]
    assert np.array_equal(rounds[-1].points, np.concatenate(expected, axis=1))
    assert np.array_equal(rounds[0].boxes, ip.bounding_boxes(masks))
    for (x, y), (nx, ny), m in zip(expected[0][:, 0].astype(int), expected[0][:, 1].astype(int), masks):
        assert m[y, x] and not m[ny, nx]
    assert all(r.msa == 0.0 for r in rounds)


def test_dataset_mean_and_errors(case):
    model, image, gt, emb = case
    out = ie.evaluate_interactive(model, [(image, gt), (image, np.zeros_like(gt))], start="point", n_iterations=2)
    assert out["n_images"] == 1 and len(out["msa"]) == len(out["sa50"]) == 2
    with pytest.raises(ValueError, match="start"):
        ie.interactive_segmentation(model, image, gt, start="mask")
    with pytest.raises(ValueError, match="no objects"):
        ie.interactive_segmentation(model, image, np.zeros_like(gt), embeddings=emb)
    with pytest.raises(ValueError, match="differ in size"):
        ie.interactive_segmentation(model, image, gt[:10], embeddings=emb)
