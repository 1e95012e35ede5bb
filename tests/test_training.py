"""usam_bioimageio.training: µSAM's iterative prompt generator and a tiny finetuning run."""

import numpy as np
import pytest
import torch

from conftest import training_crops

from usam_bioimageio.prompting import iterative as ip


def _constructed():
    gt = np.zeros((12, 12), bool)
    gt[2:6, 3:8] = True  # 4 x 5 object
    pred = np.zeros_like(gt)
    pred[3:6, 5:10] = True  # misses the left part, spills over on the right
    return gt, pred


def test_corrective_points_regions():
    gt, pred = _constructed()
    rng = np.random.default_rng(0)
    for _ in range(20):
        coords, labels = ip.corrective_points(gt[None], pred[None], rng)
        (px, py), (nx, ny) = coords[0].astype(int)
        assert gt[py, px] and not pred[py, px]  # positive where the prediction misses
        assert pred[ny, nx] and not gt[ny, nx]  # negative where it spills over
        np.testing.assert_array_equal(labels, [[1, 0]])
    # perfect prediction: positive inside the correct overlap, negative in the bbox grown by 3 minus the object
    coords, _ = ip.corrective_points(gt[None], gt[None], rng)
    (px, py), (nx, ny) = coords[0].astype(int)
    assert gt[py, px] and not gt[ny, nx] and 0 <= ny < 9 and 0 <= nx < 11
    # empty prediction of a full-width object: no bbox ring either -> background
    full = np.zeros((6, 6), bool)
    full[:, :] = True
    full[5] = False
    coords, _ = ip.corrective_points(full[None], np.zeros_like(full)[None], rng)
    assert tuple(coords[0, 1].astype(int))[1] == 5


def test_prompt_sequence_is_reproducible():
    """Seed 0, the constructed object: the exact start point, box and two rounds of corrections."""
    gt, pred = _constructed()
    rng = np.random.default_rng(0)
    coords, labels = ip.starting_points(gt[None], rng)
    boxes = ip.starting_boxes(gt[None], rng)
    first, _ = ip.corrective_points(gt[None], pred[None], rng)
    second, _ = ip.corrective_points(gt[None], gt[None], rng)
    got = [coords[0, 0].tolist(), boxes[0].tolist(), first[0].tolist(), second[0].tolist()]
    assert got == EXPECTED_SEQUENCE
    np.testing.assert_array_equal(labels, [[1]])
    np.testing.assert_array_equal(ip.bounding_boxes(gt[None]), [[3, 2, 8, 6]])


# numpy's PCG64 stream for seed 0 (stable across numpy versions). Checked by hand: (5, 5) is inside the
# object; the box is (x0, y0, x1, y1) = (3, 2, 8, 6) with exclusive ends (no distortion); (3, 4) is missed by
# the prediction, (9, 4) is where it spills over; with a perfect prediction, (3, 3) is in the object and
# (2, 2) in the bbox grown by 3 outside it.
EXPECTED_SEQUENCE = [[5.0, 5.0], [3.0, 2.0, 8.0, 6.0], [[3.0, 4.0], [9.0, 4.0]], [[3.0, 3.0], [2.0, 2.0]]]


@pytest.fixture(scope="module")
def tiny_data(data_dir):
    crops = training_crops()
    assert len(crops) >= 5
    return crops[:4], crops[4:5]


def test_training_reduces_loss_and_writes_usam_checkpoint(tiny_data, tmp_path):
    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training import TrainConfig, train
    from usam_bioimageio.training.checkpoints import load_checkpoint

    train_data, val_data = tiny_data
    torch.set_num_threads(2)
    config = TrainConfig(model_type="vit_t", n_iterations=3, n_objects=3, batch_size=2, lr=1e-4, epochs=2,
                         steps_per_epoch=6, seed=0, device="cpu", train_ais_decoder=False)
    sam = seeded_sam("vit_t", seed=0)
    trainer = train(train_data, val_data, config=config, checkpoint_dir=tmp_path, sam=sam, log=None)
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 12 and all(np.isfinite(losses))
    # same prompt type (point / box alternate) compared: first two steps vs last two
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    assert ckpt.model_type == "vit_t" and not ckpt.has_decoder
    state = trainer.sam.state_dict()
    assert set(ckpt.sam_state) == set(state)
    for key in ("mask_decoder.iou_prediction_head.layers.0.weight", "image_encoder.neck.0.weight"):
        torch.testing.assert_close(ckpt.sam_state[key], state[key].cpu())
    raw = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert all(k.startswith("sam.") for k in raw["model_state"])
    assert (tmp_path / "best.pt").is_file()
    # frozen encoder: unchanged from the initial weights
    torch.testing.assert_close(state["image_encoder.neck.0.weight"],
                               seeded_sam("vit_t", seed=0).state_dict()["image_encoder.neck.0.weight"])


def test_mask_bce_adds_cross_entropy_and_keeps_gradients_at_saturated_logits():
    """``mask_bce``: per mask, Dice + w * mean BCE, then the minimum over the masks; at logits of -8 everywhere
    (where Dice alone leaves an untrained decoder) BCE still pushes the object's pixels up."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from usam_bioimageio.training import TrainConfig
    from usam_bioimageio.training.trainer import Trainer, dice_loss

    gen = torch.Generator().manual_seed(0)
    masks = torch.randn(2, 3, 16, 16, generator=gen) * 3
    target = torch.zeros(2, 16, 16)
    target[0, 4:9, 3:8] = 1
    target[1, 10:14, 9:15] = 1
    iou = torch.rand(2, 3, generator=gen)
    per_mask = torch.stack([dice_loss(torch.sigmoid(masks[:, i]), target)
                            + 0.5 * F.binary_cross_entropy_with_logits(masks[:, i], target, reduction="none").mean((1, 2))
                            for i in range(3)])
    loss, _ = Trainer._loss(SimpleNamespace(config=TrainConfig(mask_bce=0.5)), masks, iou, target)
    torch.testing.assert_close(loss, per_mask.min(0).values.mean())
    dice_only, _ = Trainer._loss(SimpleNamespace(config=TrainConfig()), masks, iou, target)
    assert float(dice_only) < float(loss)

    grads = []
    for weight in (0.0, 1.0):
        logits = torch.full((2, 1, 16, 16), -8.0, requires_grad=True)
        Trainer._loss(SimpleNamespace(config=TrainConfig(mask_bce=weight)), logits, iou[:, :1], target)[0].backward()
        grads.append(-float(logits.grad[0, 0][target[0] > 0].mean()))  # > 0: the loss falls as they rise
    assert 0 < grads[0] < 0.02 * grads[1]  # measured: 1.3e-5 vs 2.0e-3


def test_cropped_ais_loss_sees_the_blocks_targets_and_joint_step_trains_encoder(tiny_data):
    """CPU setting ``ais_crop``: the AIS loss of a block of embedding cells is taken against the targets of the
    same block of SAM's frame (a stand-in decoder that answers with the ground truth of the block it is given,
    resized independently with scikit-image, scores ~0; one cell off scores far worse), blocks stay inside the
    image's cells; ``ais_separate_step=False`` trains the encoder and both decoders in one step."""
    from skimage.transform import resize

    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training import TrainConfig
    from usam_bioimageio.training.targets import distance_targets
    from usam_bioimageio.training.trainer import Trainer

    torch.set_num_threads(2)
    image, labels = tiny_data[0][0]
    image, labels = image[:, :40], labels[:, :40]  # not square: part of the frame is padding
    config = TrainConfig(model_type="vit_t", n_iterations=2, n_objects=2, lr=1e-3, device="cpu", seed=0,
                         train_ais_decoder=True, freeze_encoder=False, ais_crop=4, ais_separate_step=False)
    trainer = Trainer(seeded_sam("vit_t", seed=0), [(image, labels)], (), config, log=None)
    sample = trainer.train_samples[0]
    h, w = sample.input_size
    frame = np.zeros((3, 1024, 1024), np.float32)
    frame[:, :h, :w] = resize(distance_targets(labels), (3, h, w), order=1)
    cells = np.zeros((1, 256, 64, 64), np.float32)  # cell (i, j) holds i and j
    cells[0, 0], cells[0, 1] = np.mgrid[:64, :64]

    class Oracle(torch.nn.Module):
        shift = 0

        def forward(self, block):
            i, j = int(block[0, 0, 0, 0]), int(block[0, 1, 0, 0]) + self.shift
            self.seen.append((i, j - self.shift))
            return torch.from_numpy(frame[None, :, 16 * i:16 * (i + 4), 16 * j:16 * (j + 4)])

    oracle = Oracle()
    oracle.seen = []
    trainer.ais_decoder = oracle
    rng = np.random.default_rng(0)
    losses = [float(trainer.ais_loss([sample], [torch.from_numpy(cells)], rng=rng)) for _ in range(20)]
    assert max(losses) < 0.05, losses
    assert all(0 <= i <= -(-h // 16) - 4 and 0 <= j <= -(-w // 16) - 4 for i, j in oracle.seen)
    assert len(set(oracle.seen)) > 5
    oracle.shift = 1
    assert float(trainer.ais_loss([sample], [torch.from_numpy(cells)], rng=np.random.default_rng(0))) > 0.1
    # one joint step changes the encoder, the prompt decoder and the AIS decoder
    trainer = Trainer(seeded_sam("vit_t", seed=0), [(image, labels)], (), config, log=None)
    before = {k: v.clone() for k, v in trainer.sam.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in trainer.ais_decoder.state_dict().items()}
    out = trainer.train_step(trainer.train_samples)
    assert np.isfinite(out["ais_loss"]) and np.isfinite(out["loss"])
    after = trainer.sam.state_dict()
    for key in ("image_encoder.neck.0.weight", "mask_decoder.iou_prediction_head.layers.0.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert any(not torch.equal(v, trainer.ais_decoder.state_dict()[k]) for k, v in decoder_before.items())


def test_initial_checkpoint_decoder_is_trained_on_or_carried(tiny_data, tmp_path):
    """An AIS decoder in the initial checkpoint: loaded into the trained AIS decoder (lr 0: weights unchanged), or
    written unchanged into the checkpoints when neither it nor the encoder is trained; refused when only the
    encoder is trained (the decoder would no longer match it)."""
    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state
    from usam_bioimageio.training import TrainConfig, train
    from usam_bioimageio.training.checkpoints import save_training_checkpoint

    torch.set_num_threads(2)
    decoder = seeded_ais_decoder_state("vit_t", 0)
    save_training_checkpoint(tmp_path / "init.pt", sam_state=seeded_sam("vit_t", seed=0).state_dict(),
                             decoder_state=decoder)
    base = dict(model_type="vit_t", n_iterations=1, n_objects=1, epochs=1, steps_per_epoch=1, device="cpu", seed=0)
    trained = train(tiny_data[0][:1], (), config=TrainConfig(lr=0.0, ais_crop=4, **base),
                    initial_weights=tmp_path / "init.pt", checkpoint_dir=tmp_path / "a", log=None)
    for k, v in trained.ais_decoder.named_parameters():  # (BatchNorm running statistics move in training)
        assert torch.equal(v.detach(), decoder[k]), k
    train(tiny_data[0][:1], (), config=TrainConfig(lr=1e-3, train_ais_decoder=False, **base),
          initial_weights=tmp_path / "init.pt", checkpoint_dir=tmp_path / "b", log=None)
    carried = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["decoder_state"]
    assert set(carried) == set(decoder) and all(torch.equal(carried[k], decoder[k]) for k in decoder)
    with pytest.raises(ValueError, match="no longer match"):
        train(tiny_data[0][:1], (), config=TrainConfig(train_ais_decoder=False, freeze_encoder=False, **base),
              initial_weights=tmp_path / "init.pt", log=None)


def test_distance_targets_equal_torch_em():
    """torch_em's PerObjectDistanceTransform (µSAM's AIS targets), regenerated by scripts/distance_targets_reference.py."""
    import json
    from pathlib import Path

    from usam_bioimageio.training.targets import distance_targets

    ref = np.load(Path(__file__).parent / "data" / "distance_targets_reference.npz")
    meta = json.loads(str(ref["meta"]))
    assert len(meta["cases"]) == 3
    for name, case in meta["cases"].items():
        got = distance_targets(ref[f"labels_{name}"], min_size=case["min_size"])
        np.testing.assert_allclose(got, ref[f"targets_{name}"], atol=1e-6, err_msg=name)
    # no objects: background everywhere (distances 1, as torch_em fills them)
    empty = distance_targets(np.zeros((5, 7), np.uint16))
    assert empty.shape == (3, 5, 7) and not empty[0].any() and (empty[1:] == 1).all()
    with pytest.raises(ValueError, match="2D"):
        distance_targets(np.zeros((2, 5, 7)))


@pytest.mark.slow  # ~6 min on 2 cores (AIS decoder training steps, AIS package export and gate)
def test_joint_ais_decoder_training_exports_ais_packages(joint_training):
    """µSAM's joint training: the AIS decoder's loss goes down on a repeated crop, the checkpoint carries a
    decoder_state in µSAM's layout, and the exporter turns it into gated packages, AIS included, whose maps
    equal the trained decoder's."""
    from usam_bioimageio.automatic.ais.decoder import ais_maps
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.model import SamModel
    from usam_bioimageio.modeling.unetr import decoder_state_layout, maps_to_original
    from usam_bioimageio.runtime.packages import load_family
    from usam_bioimageio.training.checkpoints import load_checkpoint

    trainer, checkpoints, family = joint_training
    ais = [h["ais_loss"] for h in trainer.history]
    assert len(ais) == 3 and all(np.isfinite(ais)) and ais[-1] < ais[0]
    ckpt = load_checkpoint(checkpoints / "latest.pt")
    assert ckpt.has_decoder
    assert {k: tuple(v.shape) for k, v in ckpt.decoder_state.items()} == decoder_state_layout()
    assert set(load_family(family).packages) == {"image_encoder", "prompt_decoder", "ais", "ais_head"}
    model = SamModel.load(family)
    image = training_crops()[1][0]
    emb = compute_embeddings(model, image)
    got = ais_maps(model, image, embeddings=emb)
    with torch.no_grad():
        expected = maps_to_original(trainer.ais_decoder.eval()(torch.from_numpy(emb.features)),
                                    torch.zeros(image.shape[:2]))[0].numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_train_reads_every_checkpoint_usam_export_reads(tiny_data, tmp_path):
    """One checkpoint stack: usam train --checkpoint loads a compact int8 file (as usam export does, dequantized),
    and the trainer leaves the process's random state alone."""
    import random

    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training import TrainConfig, train
    from usam_bioimageio.training.checkpoints import load_checkpoint, save_compact_checkpoint

    save_compact_checkpoint(tmp_path / "compact.pt", sam_state=seeded_sam("vit_t", seed=0).state_dict())
    expected = load_checkpoint(tmp_path / "compact.pt").sam_state
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    config = TrainConfig(model_type="vit_t", n_iterations=1, n_objects=1, epochs=1, steps_per_epoch=1, device="cpu",
                         seed=0, lr=0.0, train_ais_decoder=False)
    trained = train(tiny_data[0][:1], (), config=config, initial_weights=tmp_path / "compact.pt", log=None)
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    for k, v in trained.sam.state_dict().items():
        assert torch.equal(v.cpu(), expected[k]), k
