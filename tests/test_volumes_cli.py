"""`usam ais` / `usam amg` on a 3D TIFF and `usam track` (issue 14's CLI verbs) on the seeded vit_t family with AIS
packages: the CLI equals the per-slice / per-frame API (merged with ``merge_slices``, linked with ``link``), with
and without a stack cache; the CTC folder reads back consistent; bad input is one line and exit 1 (2 for usage),
nothing written. Random weights give arbitrary objects: equalities and structure are tested, not quality.

Inputs are tiny: 3 slices of a GoNuclear crop (100 x 100) and 3 frames of bacteria_tracking cropped to 128 x 128;
every encoder run is paid once (two stack caches), the decoders once per CLI run.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import DATA
from usam_bioimageio.cli.main import main

GONUCLEAR = DATA / "gonuclear3d"
BACTERIA = DATA / "bacteria_tracking" / "data" / "bacteria" / "img"
AMG_FAST = ["--points-per-side", "4"]


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
    stack = tifffile.imread(GONUCLEAR / "1135_mini_raw.tif")[48:51]
    tifffile.imwrite(root / "volume.tif", stack)
    emb = _cached(model, stack, root / "volume.zarr")  # what `usam embed --cache --stack` writes
    per_slice = np.stack([automatic_instance_segmentation(model, stack[z], embeddings=emb[z]) for z in range(3)])
    return root, root / "volume.tif", stack, root / "volume.zarr", per_slice


@pytest.fixture(scope="module")
def frames(model, tmp_path_factory):
    """(folder, 3D TIFF path, frames, stack cache path, per-frame AIS labels of the API with the cache)."""
    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation

    root = tmp_path_factory.mktemp("frames")
    stack = np.stack([tifffile.imread(BACTERIA / f"t{t:06d}.tif")[680:808, 420:548] for t in range(3)])
    tifffile.imwrite(root / "frames.tif", stack)
    emb = _cached(model, stack, root / "frames.zarr")
    per_frame = np.stack([automatic_instance_segmentation(model, stack[t], embeddings=emb[t]) for t in range(3)])
    return root, root / "frames.tif", stack, root / "frames.zarr", per_frame


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
    params = AmgParameters(points_per_side=4)
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


def test_track_folder_of_frames_with_an_empty_frame(family, model, frames, tmp_path, capsys):
    """Frames sorted by name; a frame of zeros is segmented like any other (whatever AIS finds), never an error."""
    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation
    from usam_bioimageio.tracking.ctc import check_tracks, read_ctc

    _, _, stack, _, per_frame = frames
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, name in enumerate(["b.tif", "c.tif"]):
        tifffile.imwrite(folder / name, stack[t])
    tifffile.imwrite(folder / "a.tif", np.zeros_like(stack[0]))
    run(["track", "--model", family, "--image", folder, "--out", tmp_path / "ctc", "--solver", "greedy", "--quiet"],
        capsys)
    got = read_ctc(folder=tmp_path / "ctc")
    assert got.n_frames == 3 and check_tracks(masks=got.masks, tracks=got.tracks) == []
    assert same_partition(got.masks[0], automatic_instance_segmentation(model, np.zeros_like(stack[0])))
    assert same_partition(got.masks[1], per_frame[0]) and same_partition(got.masks[2], per_frame[1])


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
