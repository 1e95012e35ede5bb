"""`usam ais` / `usam amg` on a 3D TIFF and `usam track` (issue 14's CLI verbs) on the seeded vit_t family with AIS
packages: the CLI equals the per-slice / per-frame API (merged with ``merge_slices``, linked with ``link``), with
and without a stack cache; the CTC folder reads back consistent; bad input is one line and exit 1 (2 for usage),
nothing written. Random weights give arbitrary objects: equalities and structure are tested, not quality.

Inputs are tiny: 3 slices of a GoNuclear crop (100 x 100: slices 48, 49 and 48 again), also read as 3 frames of a
time series (the linker on real cell motion is scored in reports/volumes_tracking.json). The AIS decoder runs at
1024 x 1024 whatever the input (about 10 s per slice on 2 busy cores), so its maps are memoised by the embeddings
they come from (exact: the same features give the same maps) and the volume repeats a slice: the decoder runs
twice in the whole module, while every CLI run still encodes (without --embeddings), post-processes, merges or
links and writes for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import DATA
from usam_bioimageio.cli.main import main

GONUCLEAR = DATA / "gonuclear3d"
AMG_FAST = ["--points-per-side", "2"]


@pytest.fixture(scope="module", autouse=True)
def memoised_ais_maps():
    """ais_maps once per distinct embeddings (features, shape, encoder); see the module doc."""
    import hashlib

    import usam_bioimageio.automatic.ais.decoder as decoder
    from usam_bioimageio.embeddings.types import Embeddings

    real, memo = decoder.ais_maps, {}

    def ais_maps(model, image=None, *, embeddings=None, progress=False, scale=1.0):
        if not isinstance(embeddings, Embeddings) or scale != 1.0:
            return real(model, image, embeddings=embeddings, progress=progress, scale=scale)
        features = np.ascontiguousarray(embeddings.features)
        key = (hashlib.sha256(features.tobytes()).hexdigest(), features.shape, tuple(embeddings.original_shape),
               embeddings.encoder)
        if key not in memo:
            memo[key] = real(model, image, embeddings=embeddings, progress=progress)
        return memo[key].copy()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoder, "ais_maps", ais_maps)
        yield memo


@pytest.fixture(scope="module")
def family(vit_t_ais_family):
    return str(vit_t_ais_family[0])


@pytest.fixture(scope="module")
def model(family):
    from usam_bioimageio.runtime.model import SamModel

    return SamModel.load(family)


def _cached(model, stack, cache):
    from usam_bioimageio.embeddings.compute import compute_stack_embeddings

    return compute_stack_embeddings(model, stack, cache=cache, progress=False)


@pytest.fixture(scope="module")
def volume(model, tmp_path_factory):
    """(folder, 3D TIFF path, volume, stack cache path, per-slice AIS labels of the API with the cache)."""
    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation

    root = tmp_path_factory.mktemp("volume")
    stack = tifffile.imread(GONUCLEAR / "1135_mini_raw.tif")[[48, 49, 48]]
    tifffile.imwrite(root / "volume.tif", stack)
    emb = _cached(model, stack, root / "volume.zarr")  # what `usam embed --cache --stack` writes
    per_slice = np.stack([automatic_instance_segmentation(model, stack[z], embeddings=emb[z]) for z in range(3)])
    return root, root / "volume.tif", stack, root / "volume.zarr", per_slice


@pytest.fixture(scope="module")
def frames(volume):
    """The volume read as a time series (t, y, x): the same files, cache and per-frame AIS labels."""
    return volume


def run(argv, capsys, rc=0, message=None):
    capsys.readouterr()
    got = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert got == rc, f"exit {got}, expected {rc}: {err}"
    if rc:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
        assert message.lower() in err.lower(), f"{message!r} not in {err!r}"
    return out + err


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same objects under other ids: one foreground, and ids in one-to-one correspondence."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# -- usam ais / amg on a 3D TIFF ------------------------------------------------------------------------------------

def test_ais_3d_equals_merged_api_slices_with_and_without_cache(family, volume, tmp_path, capsys):
    from usam_bioimageio.volumes.merge import merge_slices

    _, path, stack, cache, per_slice = volume
    expected = merge_slices(slice_segmentation=per_slice)
    run(["ais", "--model", family, "--image", path, "--out", tmp_path / "a.tif", "--quiet"], capsys)
    run(["ais", "--model", family, "--image", path, "--out", tmp_path / "b.tif", "--embeddings", cache, "--quiet"],
        capsys)
    for name in ("a.tif", "b.tif"):
        got = tifffile.imread(tmp_path / name)
        assert got.dtype == np.uint32 and got.shape == stack.shape
        np.testing.assert_array_equal(got, expected)
    # µSAM's options reach the merge
    run(["ais", "--model", family, "--image", path, "--out", tmp_path / "c.tif", "--embeddings", cache,
         "--gap-closing", "1", "--min-z-extent", "2", "--quiet"], capsys)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "c.tif"),
                                  merge_slices(slice_segmentation=per_slice, gap_closing=1, min_z_extent=2))


def test_amg_3d_equals_merged_api_slices(family, model, volume, tmp_path, capsys):
    from usam_bioimageio.automatic.amg.generator import automatic_mask_generation
    from usam_bioimageio.automatic.amg.params import AmgParameters
    from usam_bioimageio.embeddings.cache import load_cache
    from usam_bioimageio.volumes.merge import merge_slices

    _, path, stack, cache, _ = volume
    emb = load_cache(cache)
    params = AmgParameters(points_per_side=2)
    per_slice = np.stack([automatic_mask_generation(model, stack[z], embeddings=emb[z], params=params)
                          for z in range(3)])
    run(["amg", "--model", family, "--image", path, "--out", tmp_path / "a.tif", "--embeddings", cache, "--quiet",
         *AMG_FAST], capsys)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), merge_slices(slice_segmentation=per_slice))


def test_one_slice_volume_is_that_slices_labels(family, volume, tmp_path, capsys):
    _, _, stack, _, per_slice = volume
    tifffile.imwrite(tmp_path / "one.tif", stack[:1])
    out = run(["ais", "--model", family, "--image", tmp_path / "one.tif", "--out", tmp_path / "one_labels.tif",
               "--min-z-extent", "2", "--quiet"], capsys)
    got = tifffile.imread(tmp_path / "one_labels.tif")
    assert got.shape == (1,) + stack.shape[1:] and "in 1 slices" in out
    np.testing.assert_array_equal(got[0], per_slice[0])  # nothing merged, nothing filtered


def test_ais_3d_bad_input(family, volume, tmp_path, capsys):
    root, path, stack, cache, _ = volume
    tifffile.imwrite(tmp_path / "two.tif", stack[:2])
    run(["ais", "--model", family, "--image", tmp_path / "two.tif", "--out", tmp_path / "x.tif", "--embeddings",
         cache, "--quiet"], capsys, 1, "holds 3 slices, the --image stack 2")
    run(["ais", "--model", family, "--image", tmp_path / "two.tif", "--out", tmp_path / "x.tif", "--overlay",
         tmp_path / "o.png", "--quiet"], capsys, 2, "--overlay draws one 2D image")
    tifffile.imwrite(tmp_path / "flat.tif", stack[0])
    run(["ais", "--model", family, "--image", tmp_path / "flat.tif", "--out", tmp_path / "x.tif", "--gap-closing",
         "1", "--quiet"], capsys, 2, "merge the slices of a 3D TIFF")
    (tmp_path / "exists.tif").write_bytes(b"keep")
    run(["ais", "--model", family, "--image", path, "--out", tmp_path / "exists.tif", "--quiet"], capsys, 1,
        "pass --overwrite")
    assert (tmp_path / "exists.tif").read_bytes() == b"keep"
    assert not (tmp_path / "x.tif").exists()


# -- usam track --------------------------------------------------------------------------------------------------

def test_track_writes_a_consistent_ctc_folder(family, frames, tmp_path, capsys):
    from usam_bioimageio.tracking.ctc import check_tracks, read_ctc
    from usam_bioimageio.tracking.linking import link

    _, path, stack, cache, per_frame = frames
    out = tmp_path / "ctc"
    run(["track", "--model", family, "--image", path, "--out", out, "--embeddings", cache, "--quiet"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["mask000.tif", "mask001.tif", "mask002.tif", "res_track.txt"]
    got = read_ctc(folder=out)
    assert got.n_frames == 3 and got.masks.shape == stack.shape
    assert check_tracks(masks=got.masks, tracks=got.tracks) == []
    for t in range(3):  # every AIS object of every frame, under its track id
        assert same_partition(got.masks[t], per_frame[t])
    expected = link(segmentation=per_frame, solver="auto")
    np.testing.assert_array_equal(got.masks, expected.masks)
    np.testing.assert_array_equal(got.tracks, expected.tracks)

    # existing result: refused without --overwrite, replaced with it (here by an empty result: no objects at all)
    run(["track", "--model", family, "--image", path, "--out", out, "--embeddings", cache, "--quiet"], capsys, 1,
        "pass --overwrite")
    run(["track", "--model", family, "--image", path, "--out", out, "--embeddings", cache, "--foreground-threshold",
         "1", "--solver", "greedy", "--overwrite", "--quiet"], capsys)
    empty = read_ctc(folder=out)
    assert empty.masks.shape == stack.shape and not empty.masks.any() and empty.tracks.shape == (0, 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .part / .old folder left


def test_track_folder_of_frames_sorted_by_name(family, frames, tmp_path, capsys):
    """Frames sorted by name, with their embeddings as a folder of NAME.npz (written from the stack cache)."""
    from usam_bioimageio.embeddings.cache import load_cache
    from usam_bioimageio.embeddings.npz import save_embeddings
    from usam_bioimageio.tracking.ctc import check_tracks, read_ctc

    _, _, stack, cache, per_frame = frames
    folder, emb_folder = tmp_path / "frames", tmp_path / "embeddings"
    folder.mkdir()
    emb_folder.mkdir()
    emb = load_cache(cache)
    for name, z in (("b", 0), ("a", 1)):  # b written first, sorted second
        tifffile.imwrite(folder / f"{name}.tif", stack[z])
        save_embeddings(emb_folder / f"{name}.npz", emb[z], image=stack[z])
    run(["track", "--model", family, "--image", folder, "--out", tmp_path / "ctc", "--embeddings", emb_folder,
         "--solver", "greedy", "--quiet"], capsys)
    got = read_ctc(folder=tmp_path / "ctc")
    assert got.n_frames == 2 and check_tracks(masks=got.masks, tracks=got.tracks) == []
    assert same_partition(got.masks[0], per_frame[1]) and same_partition(got.masks[1], per_frame[0])


def test_track_bad_input(family, frames, tmp_path, capsys):
    root, path, stack, cache, _ = frames
    tifffile.imwrite(tmp_path / "flat.tif", stack[0])
    run(["track", "--model", family, "--image", tmp_path / "flat.tif", "--out", tmp_path / "o", "--quiet"], capsys,
        1, "one 2D image")
    tifffile.imwrite(tmp_path / "two.tif", stack[:2])
    run(["track", "--model", family, "--image", tmp_path / "two.tif", "--out", tmp_path / "o", "--embeddings",
         cache, "--quiet"], capsys, 1, "holds 3 slices")
    odd = tmp_path / "odd"
    odd.mkdir()
    tifffile.imwrite(odd / "a.tif", stack[0])
    tifffile.imwrite(odd / "b.tif", stack[1, :64])
    run(["track", "--model", family, "--image", odd, "--out", tmp_path / "o", "--quiet"], capsys, 1, "one shape")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    run(["track", "--model", family, "--image", path, "--out", busy, "--quiet"], capsys, 1, "pass --overwrite")
    run(["track", "--model", family, "--image", path, "--out", busy, "--overwrite", "--quiet"], capsys, 1,
        "other files than a CTC result")
    assert (busy / "notes.txt").read_text() == "mine" and not (tmp_path / "o").exists()


# -- the library drivers without a model (stand-in segmenter) -------------------------------------------------------

def test_segment_slices_offsets_and_one_slice_without_a_model(monkeypatch):
    """µSAM's per-slice offsets (ids unique across slices, empty slices stay 0); a 1-slice volume is returned as
    segmented, whatever min_z_extent says; embeddings of another slice count are refused before any slice."""
    import usam_bioimageio.automatic.ais.decoder as decoder
    import usam_bioimageio.embeddings.compute as compute
    from usam_bioimageio.errors import InputError
    from usam_bioimageio.volumes.automatic import segment_slices, segment_volume
    from usam_bioimageio.volumes.merge import merge_slices

    def fake_ais(model, image, *, embeddings=None, params=None, progress=False):
        labels = np.zeros(image.shape[:2], np.uint32)
        if image.max() > 0:
            labels[2:6, 2:6], labels[8:12, 8:12] = 1, 2
        return labels

    monkeypatch.setattr(decoder, "automatic_instance_segmentation", fake_ais)
    monkeypatch.setattr(compute, "compute_embeddings", lambda model, image: None)
    volume = np.ones((3, 16, 16), np.uint8)
    volume[1] = 0
    slices = segment_slices(None, volume)
    assert [np.unique(s).tolist() for s in slices] == [[0, 1, 2], [0], [0, 3, 4]]
    np.testing.assert_array_equal(segment_volume(None, volume, min_z_extent=2),
                                  merge_slices(slice_segmentation=slices, min_z_extent=2))
    one = segment_volume(None, volume[:1], min_z_extent=2)
    assert one.shape == (1, 16, 16) and np.unique(one).tolist() == [0, 1, 2]
    with pytest.raises(InputError, match="hold 2 slices, the volume 3"):
        segment_slices(None, volume, embeddings=[None, None])


def test_track_frames_with_an_empty_frame_without_a_model(monkeypatch, tmp_path):
    """A frame without objects is an empty frame of the tracks (the tracks around it end and start), and the CTC
    folder of the result reads back consistent."""
    import usam_bioimageio.automatic.ais.decoder as decoder
    import usam_bioimageio.embeddings.compute as compute
    from usam_bioimageio.tracking.automatic import track_frames
    from usam_bioimageio.tracking.ctc import check_tracks, read_ctc, write_ctc

    def fake_ais(model, image, *, embeddings=None, params=None, progress=False):
        labels = np.zeros(image.shape[:2], np.uint32)
        if image.max() > 0:
            labels[2:6, 2:6] = 1
        return labels

    monkeypatch.setattr(decoder, "automatic_instance_segmentation", fake_ais)
    monkeypatch.setattr(compute, "compute_embeddings", lambda model, image: None)
    frames = np.ones((3, 16, 16), np.uint8)
    frames[1] = 0
    tracks = track_frames(None, frames, solver="greedy")
    assert not tracks.masks[1].any() and tracks.tracks.tolist() == [[1, 0, 0, 0], [2, 2, 2, 0]]
    write_ctc(folder=tmp_path / "ctc", tracks=tracks)
    back = read_ctc(folder=tmp_path / "ctc")
    assert check_tracks(masks=back.masks, tracks=back.tracks) == []
    empty = track_frames(None, np.zeros((2, 16, 16), np.uint8), solver="greedy")
    assert not empty.masks.any() and empty.tracks.shape == (0, 4)
