import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
DSB = DATA / "dsb2018"


def dsb_test_ids():
    return json.loads((DSB / "splits.json").read_text())["test"]


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def usam_cache(tmp_path_factory):
    """One package cache for the session, so tests never touch the user's cache."""
    import os

    path = tmp_path_factory.mktemp("usam-cache")
    os.environ["USAM_CACHE_DIR"] = str(path)
    return path


def _export(tmp_path_factory, model_type, formats=None):
    from usam_bioimageio.modeling import seeded_sam
    from usam_exporters.checkpoints import save_checkpoint
    from usam_exporters.export import export_family

    root = tmp_path_factory.mktemp(f"family-{model_type}")
    state = seeded_sam(model_type, seed=0).state_dict()
    save_checkpoint(root / f"{model_type}.pt", sam_state=state)
    sid = dsb_test_ids()[0]
    family = export_family(checkpoint=root / f"{model_type}.pt", output_dir=root / "family",
                           name=f"{model_type}_random", sample_image=DSB / "images" / f"{sid}.png",
                           sample_labels=DSB / "labels" / f"{sid}.tif", **({"formats": formats} if formats else {}))
    return family, state


@pytest.fixture(scope="session")
def vit_t_family(tmp_path_factory, usam_cache, data_dir):
    """(family folder, state dict) of a seeded random vit_t exported with our exporter."""
    return _export(tmp_path_factory, "vit_t")


@pytest.fixture(scope="session")
def vit_b_family(tmp_path_factory, usam_cache, data_dir):
    """vit_b without pytorch_state_dict weights: the gate for that format is shown on vit_t, and each gated
    format costs four vit_b encoder runs."""
    return _export(tmp_path_factory, "vit_b", formats=("onnx", "torchscript"))


def real_images():
    """A few real images of several sizes and dtypes: (name, array)."""
    import tifffile

    from usam_bioimageio.io import read_image

    bacteria = sorted((DATA / "bacteria_tracking" / "data" / "bacteria" / "img").glob("*.tif"))
    return [
        ("stardist_256_uint8", tifffile.imread(DATA / "stardist_samples" / "tests_img2d.tif")),
        ("stardist_512_uint16", tifffile.imread(DATA / "stardist_samples" / "img2d.tif")),
        ("dsb_rgb", read_image(DSB / "images" / f"{dsb_test_ids()[1]}.png")),
        ("bacteria_1305x1009", tifffile.imread(bacteria[0])),
    ]
