"""The staged training recipe (usam_bioimageio.training.recipe, issue 13): the class-balanced loss, exact
resumption, and the input size carried by the checkpoints of `usam train --image-size`."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from usam_bioimageio.training.checkpoints import load_checkpoint
from conftest import DSB as DATA
from usam_bioimageio.training.recipe import (RecipeConfig, RecipeTrainer, _uint8_like_usam, augment, balanced_bce,
                                             centre_crop, enlarged, random_crop, runtime_frame)

# the real data must be there: conftest's data_dir fails the run without it (never a silent skip)
needs_data = pytest.mark.usefixtures("data_dir")


def _numpy_balanced_bce(logits: np.ndarray, target: np.ndarray) -> float:
    """Independent: BCE written out pixel by pixel in float64, means over the two classes by boolean indexing."""
    z = logits.astype(np.float64).ravel()
    t = target.astype(bool).ravel()
    p = 1.0 / (1.0 + np.exp(-z))
    bce = np.where(t, -np.log(p), -np.log(1.0 - p))
    return (bce[t].mean() if t.any() else 0.0) + (bce[~t].mean() if (~t).any() else 0.0)


def test_balanced_bce_equals_an_independent_computation():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (4, 3, 17, 13)).astype(np.float32)
    target = np.zeros((4, 3, 17, 13), np.float32)
    target[0, :, 2:5, 3:9] = 1  # a small object
    target[1] = rng.random((3, 17, 13)) < 0.5
    target[2] = 1  # no background
    # target[3]: no object
    got = balanced_bce(torch.from_numpy(logits), torch.from_numpy(target)).numpy()
    assert got.shape == (4, 3)
    want = np.array([[_numpy_balanced_bce(logits[i, j], target[i, j]) for j in range(3)] for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a small object weighs as much as the background: predicting background everywhere is not cheap
    background = torch.full((1, 17, 13), -8.0)
    assert float(balanced_bce(background, torch.from_numpy(target[0, :1]))) > 7.0


def test_crops_keep_native_scale_and_augmentation_keeps_pairs():
    rng = np.random.default_rng(0)
    image = np.arange(300 * 200 * 3, dtype=np.uint32).reshape(300, 200, 3)
    labels = (image[..., 0] // 3 + 1).astype(np.int64)  # labels identify each pixel's value
    img, lab = augment(image, labels, rng)
    assert np.array_equal(img[..., 0] // 3 + 1, lab)
    crop, crop_labels, valid = random_crop(img, lab, 256, rng)
    assert valid == crop_labels.shape == crop.shape[:2] and max(valid) == 256 and min(valid) == 200
    assert np.array_equal(crop[..., 0] // 3 + 1, crop_labels)  # a window, not a resize


def test_enlarged_images_keep_their_labels_at_the_new_scale():
    """RecipeConfig.scale: crops come from images enlarged bilinearly, labels by nearest neighbour (no new ids)."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (30, 41, 3)).astype(np.uint8)
    labels = np.zeros((30, 41), np.int64)
    labels[4:12, 5:25], labels[15:29, 30:40] = 3, 9
    big_image, big_labels = enlarged(image, labels, 2.0)
    assert big_image.shape == (60, 82, 3) and big_image.dtype == np.uint8 and big_labels.shape == (60, 82)
    assert set(np.unique(big_labels)) == {0, 3, 9}
    for obj in (3, 9):
        assert (big_labels == obj).sum() == 4 * (labels == obj).sum()
    # the enlarged image is a smooth version of the original: block means stay close to the original pixels
    blocks = big_image.astype(np.float64).reshape(30, 2, 41, 2, 3).mean(axis=(1, 3))
    assert np.abs(blocks - image)[2:-2, 2:-2].mean() < 40
    same = enlarged(image, labels, 1.0)
    assert same[0] is image and same[1] is labels
    with pytest.raises(ValueError, match="scale"):
        RecipeConfig(scale=0.5)


def _pairs(n=2):
    from usam_bioimageio.io.datasets import read_split

    return read_split(DATA, "train", n)


def _state(trainer):
    state = {f"sam.{k}": v for k, v in trainer.sam.state_dict().items()}
    if trainer.ais_decoder is not None:
        state.update({f"decoder.{k}": v for k, v in trainer.ais_decoder.state_dict().items()})
    return state


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_runtime_frame_is_the_encoders_input_and_labels_follow():
    """Training samples in the runtime's frame: the pixels SamPreprocess (the encoder package's preprocessing)
    gives, and the labels resized to the same longest-side shape by nearest neighbour."""
    from usam_bioimageio.embeddings.compute import image_to_input
    from usam_bioimageio.modeling.preprocess import SamPreprocess

    rng = np.random.default_rng(1)
    image = rng.integers(0, 4000, (300, 170), dtype=np.uint16)
    labels = np.zeros((300, 170), np.int64)
    labels[20:120, 10:60], labels[200:290, 100:160] = 3, 7
    x, lab = runtime_frame(image, labels, 256)
    assert x.shape == (256, 145, 3) and lab.shape == (256, 145) and x.dtype == np.float32
    expected = SamPreprocess(256)(torch.from_numpy(image_to_input(image, 256)))[0].numpy()
    assert np.array_equal(x.transpose(2, 0, 1), expected[:, :256, :145])
    assert np.all(expected[:, :, 145:] == 0)  # the padding the trainer adds back
    assert set(np.unique(lab)) == {0, 3, 7}
    ys, xs = np.nonzero(lab == 3)  # object 3 spans rows 20-119, cols 10-59 of 300 x 170: scale 256 / 300
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (17, 101, 9, 50)


@needs_data
@pytest.mark.parametrize("stage", ["ais", "prompts", "ais_frames", "prompts_bf16", "ais_frozen", "ais_scaled"])
def test_resuming_reproduces_an_uninterrupted_run(tmp_path, stage):
    """Stage ais trains the encoder and the AIS decoder, stage prompts the prompt decoder (with validation);
    ais_frames: half the samples in the runtime frame, best.pt chosen by the validation images' AIS mSA;
    prompts_bf16: under bfloat16 autocast, Dice added to the mask loss; ais_frozen: the encoder's BatchNorm on
    the running statistics set at the start (with validation); ais_scaled: crops from images enlarged 1.5x,
    best.pt chosen by the AIS mSA of the validation crops."""
    torch.set_num_threads(1)  # the same thread count in both runs
    pairs = _pairs(2)
    val = pairs[:1] if stage != "ais" else ()
    frames, scaled = stage == "ais_frames", stage == "ais_scaled"
    kw = dict(stage=stage.split("_")[0], model_type="vit_t", image_size=256, seed=5, checkpoint_every=2,
              val_every=2, warmup=2, lr=1e-3, ais_crop=2, n_objects=3, n_iterations=2, val_objects=2,
              frame_prob=0.5 if frames else 0.0, val_msa=frames or scaled, scale=1.5 if scaled else 1.0,
              bf16=stage.endswith("bf16"),
              mask_dice=1.0 if stage.endswith("bf16") else 0.0,
              encoder_batchnorm="frozen" if stage.endswith("frozen") else "batch")
    full = RecipeTrainer(pairs, val, RecipeConfig(steps=3, **kw), log=None).fit(tmp_path / "full", progress=False)
    # interrupted after the checkpoint at step 2 (a run of 2 steps writes the same latest.pt), then continued
    RecipeTrainer(pairs, val, RecipeConfig(steps=2, **kw), log=None).fit(tmp_path / "part", progress=False)
    torch.manual_seed(1234), np.random.seed(1234)  # a resumed process starts from other global random states
    resumed = RecipeTrainer(pairs, val, RecipeConfig(steps=3, **kw), log=None)
    resumed.resume(tmp_path / "part" / "latest.pt")
    assert resumed.step == 2
    resumed.fit(tmp_path / "part", progress=False)
    _assert_same(_state(full), _state(resumed))
    _assert_same(full.optimizer.state_dict()["state"][0], resumed.optimizer.state_dict()["state"][0])
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "cpu_seconds"} for r in rows]  # noqa: E731
    assert drop(full.validation) == drop(resumed.validation)
    if frames or scaled:
        assert all(0.0 <= v["val_ais_msa"] <= 1.0 and v["metric"] == 1.0 - v["val_ais_msa"] for v in full.validation)
    if scaled:  # validated on the centre crop of the enlarged image, scored against that crop's labels
        image, labels = val[0]
        expected = centre_crop(*enlarged(_uint8_like_usam(image), np.asarray(labels).astype(np.int64), 1.5), 256)[1]
        np.testing.assert_array_equal(full.val_labels[0], expected)
    # the checkpoints record the scale the model was trained at (the exporter's config.usam.pixel_scale)
    assert load_checkpoint(tmp_path / "part" / "latest.pt").pixel_scale == (1.5 if scaled else 1.0)
    names = ("history.csv", "curves.png", "latest.pt") + (("validation.csv", "best.pt") if val else ())
    for name in names:
        assert (tmp_path / "part" / name).is_file()
    rows = list(csv.DictReader(open(tmp_path / "part" / "history.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(math.isfinite(float(r["loss"])) for r in rows)


@needs_data
def test_usam_train_image_size_256_writes_a_256_checkpoint(tmp_path):
    from usam_bioimageio.cli.train import train_main

    out = tmp_path / "run"
    train_main(["--data", str(DATA), "--val-limit", "1", "--output", str(out), "--model-type", "vit_t",
                "--image-size", "256", "--stage", "prompts", "--steps", "1", "--n-objects", "2", "--n-iterations",
                "1", "--threads", "1", "--no-progress", "--train-split", "val"])
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt.image_size == 256 and ckpt.model_type == "vit_t"
    assert ckpt.has_decoder  # the (untrained) AIS decoder is carried along, so the exporter writes AIS packages


@needs_data
def test_rerunning_a_finished_stage_does_nothing(tmp_path, capsys):
    """A build rerun after a stage finished: --checkpoint is that stage's latest.pt at --steps, so nothing is
    prepared or trained and the checkpoint stays as it was."""
    from usam_bioimageio.cli.train import train_main

    out = tmp_path / "run"
    args = ["--data", str(DATA), "--val-limit", "1", "--output", str(out), "--model-type", "vit_t", "--image-size",
            "256", "--stage", "prompts", "--steps", "1", "--n-objects", "2", "--n-iterations", "1", "--threads", "1",
            "--no-progress", "--train-split", "val"]
    train_main(args)
    before = (out / "latest.pt").read_bytes()
    capsys.readouterr()
    train_main(args + ["--checkpoint", str(out / "latest.pt")])
    assert f"stage prompts: {out / 'latest.pt'} is at step 1 of 1; nothing to do" in capsys.readouterr().out
    assert (out / "latest.pt").read_bytes() == before


@needs_data
def test_usam_train_without_stage_at_256_writes_a_256_checkpoint(tmp_path):
    """µSAM's finetuning (no --stage) at input size 256: built, trained and saved at 256."""
    from usam_bioimageio.cli.train import train_main

    out = tmp_path / "run"
    train_main(["--data", str(DATA), "--train-split", "val", "--val-limit", "1", "--output", str(out),
                "--model-type", "vit_t", "--image-size", "256", "--epochs", "1", "--steps-per-epoch", "1",
                "--n-objects", "2", "--n-iterations", "1", "--ais-crop", "4", "--mask-bce", "1"])
    for name in ("latest.pt", "best.pt"):
        ckpt = load_checkpoint(out / name)
        assert ckpt.image_size == 256 and ckpt.has_decoder


@needs_data
def test_batchnorm_recalibration_sets_the_mean_of_per_sample_statistics():
    """The encoder's BatchNorm running statistics after recalibration: the mean over the samples of each
    sample's own statistics (as training normalises), computed here from the layer's inputs."""
    torch.set_num_threads(1)
    trainer = RecipeTrainer(_pairs(2), (), RecipeConfig(stage="ais", model_type="vit_t", image_size=256, seed=2),
                            log=None)
    norm = next(m for m in trainer.sam.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = norm.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().double()))
    trainer.recalibrate_batchnorm(samples=3)
    hook.remove()
    assert len(seen) == 3 and norm.momentum == 0.1 and not trainer.sam.image_encoder.training
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen])  # torch keeps the unbiased one
    torch.testing.assert_close(norm.running_mean.double(), means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var.double(), variances.mean(0), rtol=1e-4, atol=1e-5)
    assert int(norm.num_batches_tracked) == 3


@needs_data
def test_frozen_encoder_batchnorm_trains_with_the_statistics_inference_uses(tmp_path):
    """encoder_batchnorm="frozen": the running statistics are set by one recalibration when the run starts and
    stay unchanged by training steps, and the encoder in training mode computes what it computes in eval mode
    (the "batch" default normalises each training batch with its own statistics instead)."""
    torch.set_num_threads(1)
    kw = dict(stage="ais", model_type="vit_t", image_size=256, seed=3, steps=2, ais_crop=2, warmup=1,
              checkpoint_every=2, val_every=2)
    start = RecipeTrainer(_pairs(2), (), RecipeConfig(encoder_batchnorm="frozen", **kw), log=None)
    start.recalibrate_batchnorm()
    at_start = {k: v.clone() for k, v in start.sam.image_encoder.state_dict().items() if "running" in k}
    assert at_start
    trained = RecipeTrainer(_pairs(2), (), RecipeConfig(encoder_batchnorm="frozen", **kw), log=None)
    weights_before = {k: v.clone() for k, v in trained.sam.image_encoder.state_dict().items() if "weight" in k}
    trained.fit(tmp_path / "frozen", progress=False)
    after = trained.sam.image_encoder.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in weights_before.items())  # it did train
    for k, v in at_start.items():
        assert torch.equal(after[k], v), k
    x = torch.cat([c.x for c in trained.sample_crops(np.random.default_rng(0))])
    with torch.no_grad():
        torch.testing.assert_close(trained._encode(x, train=True), trained._encode(x, train=False))
        batch = RecipeTrainer(_pairs(2), (), RecipeConfig(**kw), log=None)
        batch.sam.load_state_dict(trained.sam.state_dict())
        assert not torch.allclose(batch._encode(x, train=True), batch._encode(x, train=False), atol=1e-3)
    with pytest.raises(ValueError, match="encoder_batchnorm"):
        RecipeConfig(encoder_batchnorm="instance")
