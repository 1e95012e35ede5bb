"""Volumes and tracking without model weights: the multicut against an exact ILP, µSAM's 3D merge, the linker,
CTC folders and the CTC metrics (py-ctcmetrics: part of the test extra, so a missing one fails here)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from usam_bioimageio.evaluation.ctc_metrics import ctc_scores, ctc_scores_of_tracks, volume_scores
from usam_bioimageio.tracking.ctc import CtcTracks, check_tracks, ctc_files, read_ctc, track_table, write_ctc
from usam_bioimageio.tracking.linking import LinkingParams, candidate_graph, link, motile_available
from usam_bioimageio.volumes.merge import merge_slices, overlap_weights, relabel_slices
from usam_bioimageio.volumes.multicut import multicut, multicut_energy, multicut_ilp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GONUCLEAR = DATA / "gonuclear3d" / "1135_mini_labels.tif"


# ---------------------------------------------------------------------------------------------- multicut


def _random_graph(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 15))
    density = rng.uniform(0.3, 0.7)
    edges = np.array([(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < density]).reshape(-1, 2)
    return n, edges, rng.normal(0.0, 1.0, len(edges))


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def test_ilp_is_exact_against_enumeration():
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        n = 6
        edges = np.array(list(itertools.combinations(range(n), 2)))
        costs = rng.normal(0.0, 1.0, len(edges))
        best = np.inf
        for part in _partitions(list(range(n))):
            labels = np.empty(n, dtype=np.int64)
            for k, block in enumerate(part):
                labels[block] = k
            best = min(best, multicut_energy(edges=edges, costs=costs, labels=labels))
        exact = multicut_ilp(n_nodes=n, edges=edges, costs=costs)
        assert multicut_energy(edges=edges, costs=costs, labels=exact) == pytest.approx(best, abs=1e-9)


def test_multicut_reaches_the_ilp_optimum_on_20_random_graphs():
    """Stated gap: at least 19 of 20 graphs (8-14 nodes) exactly optimal, none worse than 2 % of the optimum."""
    exact_count, worst = 0, 0.0
    for seed in range(20):
        n, edges, costs = _random_graph(seed)
        heuristic = multicut(n_nodes=n, edges=edges, costs=costs)
        optimum = multicut_ilp(n_nodes=n, edges=edges, costs=costs)
        e_h = multicut_energy(edges=edges, costs=costs, labels=heuristic)
        e_o = multicut_energy(edges=edges, costs=costs, labels=optimum)
        assert e_h >= e_o - 1e-9  # the ILP is a lower bound
        exact_count += e_h <= e_o + 1e-9
        worst = max(worst, (e_h - e_o) / max(abs(e_o), 1e-9))
    assert exact_count >= 19 and worst <= 0.02, (exact_count, worst)


def test_multicut_simple_cases_and_bad_input():
    assert multicut(n_nodes=3, edges=np.zeros((0, 2)), costs=np.zeros(0)).tolist() == [0, 1, 2]
    chain = np.array([[0, 1], [1, 2], [2, 3]])
    assert multicut(n_nodes=4, edges=chain, costs=np.ones(3)).tolist() == [0, 0, 0, 0]
    assert multicut(n_nodes=4, edges=chain, costs=-np.ones(3)).tolist() == [0, 1, 2, 3]
    # a triangle with one strong repulsion: cut the repulsive edge and the weaker attraction
    triangle = np.array([[0, 1], [1, 2], [0, 2]])
    labels = multicut(n_nodes=3, edges=triangle, costs=np.array([1.0, 2.0, -5.0]))
    assert labels[1] == labels[2] != labels[0]
    with pytest.raises(ValueError, match="costs"):
        multicut(n_nodes=2, edges=np.array([[0, 1]]), costs=np.zeros(2))
    with pytest.raises(ValueError, match="endpoints"):
        multicut(n_nodes=2, edges=np.array([[0, 2]]), costs=np.zeros(1))


# ---------------------------------------------------------------------------------------------- 3D merge


def _slices_of(volume: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each slice relabelled on its own (shuffled ids), as a per-slice segmentation would come."""
    rng = np.random.default_rng(seed)
    out = np.zeros(volume.shape, dtype=np.int32)
    for z in range(volume.shape[0]):
        ids = np.unique(volume[z])
        ids = ids[ids > 0]
        lut = np.zeros(int(volume.max()) + 1, dtype=np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1
        out[z] = lut[volume[z]]
    return out


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


def _toy_volume() -> np.ndarray:
    vol = np.zeros((8, 24, 24), dtype=np.uint16)
    vol[0:6, 2:10, 2:10] = 1
    vol[1:8, 12:22, 3:11] = 2
    vol[2:7, 3:11, 13:21] = 3
    return vol


def test_musam_costs():
    # µSAM: w = 1 - log((1 - p) / p), p clipped to [0.001, 0.999]; zero at p = 1 / (1 + e)
    assert overlap_weights(fractions=np.array([0.5]))[0] == pytest.approx(1.0)
    assert overlap_weights(fractions=np.array([1.0 / (1.0 + np.e)]))[0] == pytest.approx(0.0, abs=1e-2)
    assert overlap_weights(fractions=np.array([0.0]))[0] == pytest.approx(1.0 - np.log(0.999 / 0.001))
    # a higher beta splits more
    assert overlap_weights(fractions=np.array([0.5]), beta=0.7)[0] < 1.0
    with pytest.raises(ValueError):
        overlap_weights(fractions=np.array([0.5]), beta=1.0)


def test_merge_tiny_volume():
    vol = _toy_volume()
    merged = merge_slices(slice_segmentation=_slices_of(vol))
    assert merged.dtype == np.uint32 and merged.max() == 3
    assert _same_partition(merged, vol)


def test_merge_gap_closing_and_min_z_extent():
    vol = _toy_volume()
    gapped = vol.copy()
    gapped[3][gapped[3] == 2] = 0  # object 2 misses slice 3
    gapped[7, 2:6, 14:18] = 4  # a one-slice object
    plain = merge_slices(slice_segmentation=_slices_of(gapped))
    assert plain.max() == 5  # object 2 in two pieces, plus the one-slice object
    closed = merge_slices(slice_segmentation=_slices_of(gapped), gap_closing=1, min_z_extent=2)
    assert closed.max() == 3
    assert _same_partition(closed, vol)


def test_merge_bad_input_and_edge_cases():
    with pytest.raises(ValueError, match="3D"):
        merge_slices(slice_segmentation=np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="integer"):
        merge_slices(slice_segmentation=np.zeros((2, 4, 4), dtype=np.float32))
    one = np.zeros((1, 6, 6), dtype=np.uint16)
    one[0, 1:3, 1:3], one[0, 4:6, 4:6] = 7, 9
    assert sorted(np.unique(merge_slices(slice_segmentation=one)).tolist()) == [0, 1, 2]
    assert merge_slices(slice_segmentation=np.zeros((3, 5, 5), dtype=np.uint8)).max() == 0
    labels, n = relabel_slices(stack=np.array([[[0, 5], [5, 2]], [[3, 3], [0, 0]]]))
    assert n == 3 and labels.tolist() == [[[0, 2], [2, 1]], [[3, 3], [0, 0]]]


def test_merge_gonuclear_crop():
    """A GoNuclear ground-truth crop cut into slices: µSAM's weight cuts the lower caps of nuclei off (an
    object that shrinks along z), the symmetric weight (ours, opt-in) gives the ground truth back."""
    import tifffile

    gt = tifffile.imread(GONUCLEAR)[20:60, 20:70, 20:70]
    slices = _slices_of(gt)
    musam = merge_slices(slice_segmentation=slices)
    assert 0.3 < volume_scores(prediction=musam, ground_truth=gt)["msa"] < 1.0
    symmetric = merge_slices(slice_segmentation=slices, overlap="max")
    assert volume_scores(prediction=symmetric, ground_truth=gt)["msa"] == pytest.approx(1.0)
    filtered = merge_slices(slice_segmentation=slices, min_z_extent=3)
    assert volume_scores(prediction=filtered, ground_truth=gt)["msa"] > volume_scores(
        prediction=musam, ground_truth=gt)["msa"]


def test_msa_is_3d():
    vol = _toy_volume()
    assert volume_scores(prediction=vol, ground_truth=vol)["msa"] == 1.0
    split = vol.copy()
    split[4:][split[4:] == 1] = 5  # object 1 cut in two along z
    scores = volume_scores(prediction=split, ground_truth=vol)
    assert scores["msa"] < 1.0
    with pytest.raises(ValueError):
        volume_scores(prediction=vol[0], ground_truth=vol[0])


# ---------------------------------------------------------------------------------------------- tracking


def _rod(shape, centre, half):
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (np.abs(yy - centre[0]) <= half[0]) & (np.abs(xx - centre[1]) <= half[1])


def _division_movie():
    """Ground truth: track 1 lives in frames 0-5; track 2 grows and divides after frame 2 into 3 and 4; the
    whole field shifts by 9 pixels per frame (more than a rod's width: no overlap without the motion model)."""
    shape, masks, rows = (64, 96), [], []
    for t in range(6):
        frame = np.zeros(shape, dtype=np.uint16)
        shift = 9 * t
        frame[_rod(shape, (12, 8 + shift), (3, 6))] = 1
        if t <= 2:
            frame[_rod(shape, (40, 10 + shift), (3, 8 + t))] = 2
        else:
            frame[_rod(shape, (40, 2 + shift), (3, 5))] = 3
            frame[_rod(shape, (40, 19 + shift), (3, 5))] = 4
        masks.append(frame)
    masks = np.stack(masks)
    rows = np.array([[1, 0, 5, 0], [2, 0, 2, 0], [3, 3, 5, 2], [4, 3, 5, 2]], dtype=np.int64)
    return CtcTracks(masks=masks, tracks=rows)


def _same_tracks(result: CtcTracks, truth: CtcTracks) -> bool:
    """Equal up to track ids: the same objects per frame and the same lineage."""
    mapping = {}
    for t in range(truth.n_frames):
        for label in np.unique(truth.masks[t])[1:].tolist():
            ours = np.unique(result.masks[t][truth.masks[t] == label])
            if len(ours) != 1:
                return False
            if mapping.setdefault(label, int(ours[0])) != int(ours[0]):
                return False
    if len(set(mapping.values())) != len(mapping):
        return False
    parents = result.parents()
    return all(parents.get(mapping[label], 0) == (mapping[p] if p else 0) for label, p in
               ((int(r[0]), int(r[3])) for r in truth.tracks))


@pytest.mark.parametrize("solver", ["greedy", "motile"])
def test_linker_with_a_division(solver):
    truth = _division_movie()
    if solver == "motile":
        assert motile_available()  # part of the test extra: never skipped
    result = link(segmentation=_slices_of(truth.masks), solver=solver)
    assert check_tracks(masks=result.masks, tracks=result.tracks) == []
    assert _same_tracks(result, truth), result.tracks


def test_linker_empty_frames_and_bad_input():
    truth = _division_movie()
    masks = truth.masks.copy()
    masks[3] = 0  # an empty frame: tracks end before it and start after it
    result = link(segmentation=masks, solver="greedy")
    assert check_tracks(masks=result.masks, tracks=result.tracks) == []
    assert not result.masks[3].any() and len(result.tracks) == 5  # 2 tracks before the gap, 3 after
    empty = link(segmentation=np.zeros((3, 8, 8), dtype=np.uint8), solver="greedy")
    assert empty.tracks.shape == (0, 4)
    with pytest.raises(ValueError, match="solver"):
        link(segmentation=masks, solver="hungarian")
    with pytest.raises(ValueError, match="time series"):
        link(segmentation=np.zeros((8, 8), dtype=np.uint8))
    graph = candidate_graph(segmentation=truth.masks, params=LinkingParams())
    assert graph.n_nodes == int(sum(len(np.unique(f)) - 1 for f in truth.masks))


def test_ctc_round_trip(tmp_path):
    truth = _division_movie()
    folder = write_ctc(folder=tmp_path / "res", tracks=truth)
    assert sorted(p.name for p in folder.iterdir())[:2] == ["mask000.tif", "mask001.tif"]
    back = read_ctc(folder=folder)
    assert np.array_equal(back.masks, truth.masks) and np.array_equal(back.tracks, truth.tracks)
    gt = write_ctc(folder=tmp_path / "gt" / "TRA", tracks=truth, result=False)
    assert (gt / "man_track.txt").is_file() and (gt / "man_track005.tif").is_file()
    assert np.array_equal(read_ctc(folder=tmp_path / "gt").tracks, truth.tracks)  # the folder holding TRA
    assert np.array_equal(track_table(masks=truth.masks, parents=truth.parents()), truth.tracks)
    # 4-digit man_track names with a man_track.txt (as a peer's RES folder) read too
    peer = tmp_path / "peer"
    peer.mkdir()
    for t, path in enumerate(ctc_files(folder=folder).frames):
        (peer / f"man_track{t:04d}.tif").write_bytes(path.read_bytes())
    (peer / "man_track.txt").write_text((folder / "res_track.txt").read_text())
    assert np.array_equal(read_ctc(folder=peer).masks, truth.masks)


def test_ctc_bad_input(tmp_path):
    truth = _division_movie()
    broken = truth.tracks.copy()
    broken[2, 1] = 2  # track 3 claims to begin in frame 2
    problems = check_tracks(masks=truth.masks, tracks=broken)
    assert any("track 3" in p for p in problems)
    with pytest.raises(ValueError, match="inconsistent"):
        write_ctc(folder=tmp_path / "x", tracks=CtcTracks(masks=truth.masks, tracks=broken))
    with pytest.raises(FileNotFoundError):
        read_ctc(folder=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="res_track|frames"):
        read_ctc(folder=tmp_path / "empty")


def test_ctc_metrics_tiny_case(tmp_path):
    truth = _division_movie()
    perfect = ctc_scores_of_tracks(result=truth, ground_truth=truth)
    assert perfect["TRA"] == pytest.approx(1.0) and perfect["DET"] == pytest.approx(1.0)
    # break the lineage: the daughters lose their parent (two edges to add; AOGM weighs each 1.5)
    orphans = truth.tracks.copy()
    orphans[2:, 3] = 0
    scores = ctc_scores_of_tracks(result=CtcTracks(masks=truth.masks, tracks=orphans), ground_truth=truth)
    assert scores["DET"] == pytest.approx(1.0) and scores["TRA"] < 1.0
    assert scores["AOGM_EA"] == 2 and scores["AOGM"] == pytest.approx(3.0)
    # folders work the same
    res = write_ctc(folder=tmp_path / "res", tracks=truth)
    gt = write_ctc(folder=tmp_path / "gt" / "TRA", tracks=truth, result=False)
    assert ctc_scores(result=res, ground_truth=tmp_path / "gt")["TRA"] == pytest.approx(1.0)
    assert ctc_scores(result=res, ground_truth=gt)["TRA"] == pytest.approx(1.0)
