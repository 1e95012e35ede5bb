import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
DSB = DATA / "dsb2018"
ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST_ENVS = pytest.StashKey()


def _start_host_envs() -> "subprocess.Popen":
    import subprocess

    return subprocess.Popen(["bash", str(ROOT / "scripts" / "host_envs.sh"), "--quick"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def pytest_collection_modifyitems(session, config, items):
    """The host check's environments (pip / npm / apt: mostly downloads and unpacking) install in the background
    from the start of the run, beside the CPU-bound tests, when a `hosts` test is selected; test_hosts waits."""
    if any(item.get_closest_marker("hosts") for item in items):
        config.stash[HOST_ENVS] = _start_host_envs()


def host_envs_installed(config) -> None:
    """Wait for the background install (started above, or now) and fail with its errors."""
    proc = config.stash.get(HOST_ENVS, None) or _start_host_envs()
    config.stash[HOST_ENVS] = proc
    _, err = proc.communicate()
    assert proc.returncode == 0, f"host environments could not be installed:\n{(err or '')[-3000:]}"


def dsb_test_ids():
    return json.loads((DSB / "splits.json").read_text())["test"]


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.fail(f"real data not found at {DATA}: the tests need ../shared/data beside the checkout (never skipped)")
    return DATA


@pytest.fixture(scope="session")
def usam_cache(tmp_path_factory):
    """One package cache for the session, so tests never touch the user's cache."""
    import os

    path = tmp_path_factory.mktemp("usam-cache")
    os.environ["USAM_CACHE_DIR"] = str(path)
    return path


def _export(tmp_path_factory, model_type, formats=None, test=True):
    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training.checkpoints import save_checkpoint
    from usam_exporters.family import export_family

    root = tmp_path_factory.mktemp(f"family-{model_type}")
    state = seeded_sam(model_type, seed=0).state_dict()
    save_checkpoint(root / f"{model_type}.pt", sam_state=state)
    sid = dsb_test_ids()[0]
    family = export_family(checkpoint=root / f"{model_type}.pt", output_dir=root / "family",
                           name=f"{model_type}_random", sample_image=DSB / "images" / f"{sid}.png",
                           sample_labels=DSB / "labels" / f"{sid}.tif", test=test,
                           **({"formats": formats} if formats else {}))
    return family, state


@pytest.fixture(scope="session")
def vit_t_family(tmp_path_factory, usam_cache, data_dir):
    """(family folder, state dict) of a seeded random vit_t exported with our exporter."""
    return _export(tmp_path_factory, "vit_t")


@pytest.fixture(scope="session")
def vit_b_family(tmp_path_factory, usam_cache, data_dir):
    """vit_b ONNX weights, not gated by bioimageio.core: every format and its gate are shown on vit_t (same
    exporter code); tracing, writing and running vit_b's torchscript too costs CI over a minute. The slow
    tests export vit_b gated in both formats (``test_vit_b_export_is_gated``) and compare its torchscript."""
    return _export(tmp_path_factory, "vit_b", formats=("onnx",), test=False)


def vit_b_two_blocks():
    """vit_b's ViT encoder cut to its first windowed and first global-attention block: every code path of the ViT
    encoders (vit_b / vit_l / vit_h: patch embedding, absolute and decomposed relative positions, windowed and
    global attention, neck) at a sixth of vit_b's cost."""
    import dataclasses

    from usam_bioimageio import registry

    return dataclasses.replace(registry.ARCHITECTURES["vit_b"], depth=2, global_attn_indexes=(1,))


@pytest.fixture(scope="session")
def vit_b_two_block_family(tmp_path_factory, usam_cache, data_dir):
    """(family folder, state dict) of a seeded ``vit_b_two_blocks()`` exported as model type vit_b (ONNX, not
    gated): the registry entry is replaced only while the family is built and exported."""
    from usam_bioimageio import registry

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.ARCHITECTURES, "vit_b", vit_b_two_blocks())
        return _export(tmp_path_factory, "vit_b", formats=("onnx",), test=False)


def real_images():
    """A few real images of several sizes and dtypes: (name, array)."""
    import tifffile

    from usam_bioimageio.io.images import read_image

    bacteria = sorted((DATA / "bacteria_tracking" / "data" / "bacteria" / "img").glob("*.tif"))
    return [
        ("stardist_256_uint8", tifffile.imread(DATA / "stardist_samples" / "tests_img2d.tif")),
        ("stardist_512_uint16", tifffile.imread(DATA / "stardist_samples" / "img2d.tif")),
        ("dsb_rgb", read_image(DSB / "images" / f"{dsb_test_ids()[1]}.png")),
        ("bacteria_1305x1009", tifffile.imread(bacteria[0])),
    ]


@pytest.fixture(scope="session")
def model(vit_t_family):
    """The seeded vit_t family loaded for ONNX Runtime (modules may define their own ``model``)."""
    from usam_bioimageio.runtime.model import SamModel

    return SamModel.load(vit_t_family[0])


@pytest.fixture(scope="session")
def image():
    """A real 256 x 256 uint8 image (StarDist's test image)."""
    return real_images()[0][1]


@pytest.fixture(scope="session")
def embeddings(model, image):
    """``model``'s embeddings of ``image``."""
    from usam_bioimageio.embeddings.compute import compute_embeddings

    return compute_embeddings(model, image)


def training_crops(n: int = 12, n_min: int = 3):
    """128 x 128 crops (image, labels) of the first ``n`` DSB2018 train images with >= ``n_min`` objects."""
    import tifffile

    from usam_bioimageio.io.images import read_image

    ids = json.loads((DSB / "splits.json").read_text())["train"][:n]
    out = []
    for sid in ids:
        image = read_image(DSB / "images" / f"{sid}.png")
        labels = tifffile.imread(DSB / "labels" / f"{sid}.tif")
        crop = labels[:128, :128]
        if len(np.unique(crop)) - 1 >= n_min:
            out.append((image[:128, :128], crop))
    return out


@pytest.fixture(scope="session")
def vit_t_host_family(tmp_path_factory, usam_cache, data_dir):
    """The host check's family (``scripts/host_check.py``): the seeded vit_t (as ``vit_t_family``) with a seeded
    UNETR decoder (seed ``host_check.AIS_DECODER_SEED``), all four packages in ONNX and torchscript, not gated here:
    ``tests/test_hosts.py`` runs every package in every host runtime and in bioimageio.core."""
    import host_check

    return host_check.export_test_family(tmp_path_factory.mktemp("hosts-family"), quick=True)


@pytest.fixture(scope="session")
def vit_t_ais_family(vit_t_host_family):
    """(folder, decoder state) of a family with AIS packages (``ais`` and ``ais_head``), for runtime tests."""
    import host_check

    from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state

    return vit_t_host_family, seeded_ais_decoder_state("vit_t", host_check.AIS_DECODER_SEED, use_conv_transpose=True)


@pytest.fixture(scope="session")
def joint_training(tmp_path_factory, usam_cache, data_dir):
    """A short µSAM joint training run (seeded vit_t, frozen encoder, prompt decoder + AIS decoder; 3 steps on
    one DSB2018 crop) and the family our exporter makes of its checkpoint (ONNX weights, every package gated
    by bioimageio.core). Returns (trainer, checkpoint folder, family folder). About 6 min on 2 cores: the AIS
    decoder's full-resolution layers dominate training and the export's gate."""
    import torch

    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training import TrainConfig, train
    from usam_exporters.family import export_family

    root = tmp_path_factory.mktemp("joint")
    torch.set_num_threads(2)
    config = TrainConfig(model_type="vit_t", n_iterations=1, n_objects=2, batch_size=1, lr=1e-3, epochs=1,
                         steps_per_epoch=3, seed=0, device="cpu", train_ais_decoder=True, ais_min_size=5)
    trainer = train(training_crops()[:1], (), config=config, checkpoint_dir=root / "checkpoints",
                    sam=seeded_sam("vit_t", seed=0), log=None)
    sid = dsb_test_ids()[0]
    family = export_family(checkpoint=root / "checkpoints" / "latest.pt", output_dir=root / "family",
                           name="vit_t_joint", formats=("onnx",), sample_image=DSB / "images" / f"{sid}.png",
                           sample_labels=DSB / "labels" / f"{sid}.tif")
    return trainer, root / "checkpoints", family
