"""Grid search of AIS / AMG thresholds, test-split scores, and the classical baseline."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DSB, dsb_test_ids

from usam_bioimageio.evaluation import automatic as ae
from usam_bioimageio.automatic.amg.params import AmgParameters
from usam_bioimageio.automatic.amg.generator import automatic_mask_generation
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.evaluation.baseline import otsu_watershed
from usam_bioimageio.evaluation.metrics import mean_segmentation_accuracy
from usam_bioimageio.runtime.model import SamModel


def _dsb(k: int):
    import tifffile

    from usam_bioimageio.io.images import read_image

    sid = dsb_test_ids()[k]
    return read_image(DSB / "images" / f"{sid}.png"), tifffile.imread(DSB / "labels" / f"{sid}.tif")


@pytest.fixture(scope="module")
def ais_model(vit_t_ais_family):
    return SamModel.load(vit_t_ais_family[0])


def test_amg_candidates_give_what_generate_gives(ais_model, data_dir):
    image = _dsb(0)[0][:200, :240]
    emb = compute_embeddings(ais_model, image)
    base = AmgParameters(points_per_side=12)
    grid = {"pred_iou_thresh": (0.0,), "stability_score_thresh": (0.1, 0.3)}
    candidates = ae.amg_candidates(ais_model, image, grid, embeddings=emb, base=base)
    for combo in ae.combinations(grid):
        expected = automatic_mask_generation(ais_model, image, embeddings=emb,
                                             params=AmgParameters(points_per_side=12, **combo))
        assert np.array_equal(ae.amg_segment(candidates, combo), expected), combo
    with pytest.raises(ValueError, match="crop layer"):
        ae.amg_candidates(ais_model, image, grid, embeddings=emb, base=AmgParameters(crop_n_layers=1))


def test_grid_search_picks_the_best_combination(data_dir):
    """On maps a perfect decoder would give (the ground truth's training targets), the search scores every
    combination and returns the one with the highest mean mSA; default-like thresholds segment the objects well."""
    from usam_bioimageio.training.targets import distance_targets

    pairs = [_dsb(k) for k in (0, 1)]
    maps = [distance_targets(gt) for _, gt in pairs]
    grid = {"center_distance_threshold": (0.05, 0.5), "boundary_distance_threshold": (0.5,), "min_size": (0, 10)}
    best, table = ae.grid_search(maps, [gt for _, gt in pairs], grid, ae.ais_segment)
    assert len(table) == 4 and set(best) == set(grid)
    assert max(r["msa"] for r in table) == next(r["msa"] for r in table if all(r[k] == best[k] for k in grid))
    assert max(r["msa"] for r in table) > 0.7
    assert ae.combinations({"a": (1, 2), "b": (3,)}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


def test_evaluate_automatic_on_val_and_test_splits(ais_model, data_dir):
    val = [tuple(a[:128, :128] for a in _dsb(k)) for k in (2, 3)]
    test = [tuple(a[:128, :128] for a in _dsb(k)) for k in (4,)]
    out = ae.evaluate_automatic(ais_model, val, test, mode="ais",
                                grid={"center_distance_threshold": (0.4, 0.6), "min_size": (0,)})
    assert len(out["val_table"]) == 2 and len(out["test_per_image"]) == 1
    assert 0.0 <= out["test"]["msa"] <= 1.0
    with pytest.raises(ValueError, match="mode"):
        ae.evaluate_automatic(ais_model, val, test, mode="otsu")


def test_otsu_baseline_on_real_nuclei(data_dir):
    scores = [mean_segmentation_accuracy(otsu_watershed(image), gt)[0]
              for image, gt in (_dsb(k) for k in range(4))]
    assert np.mean(scores) > 0.2, scores  # a real baseline, not a stub
    assert not otsu_watershed(np.full((32, 32), 7, np.uint8)).any()


NO_TORCH = "import sys; sys.modules['torch'] = None; from usam_bioimageio.cli.main import main; sys.exit(main(sys.argv[1:]))"


def test_usam_evaluate_writes_a_report(vit_t_ais_family, tmp_path, data_dir):
    """On an ONNX-only install: the run is a subprocess in which torch cannot be imported."""
    import json
    import subprocess
    import sys

    out = tmp_path / "report"
    args = ["evaluate", "--model", str(vit_t_ais_family[0]), "--data", str(DSB), "--out", str(out),
            "--modes", "baseline", "interactive", "--limit", "2", "--n-iterations", "2", "--quiet"]
    run = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    help_text = subprocess.run([sys.executable, "-c", NO_TORCH, "evaluate", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--modes" in help_text.stdout
    results = json.loads((out / "results.json").read_text())  # (AIS / AMG: test_evaluate_automatic_...)
    assert results["n_test"] == 2 and len(results["interactive"]["box"]["msa"]) == 2
    text = (out / "report.md").read_text()
    assert "Otsu" in text and "interactive from a point, after 1 corrections" in text and "usam evaluate" in text
    assert (out / "interactive.png").stat().st_size > 1000 and (out / "automatic.png").is_file()
