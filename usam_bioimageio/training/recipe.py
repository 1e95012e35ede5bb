"""Training a SAM-family model from random initialisation in stages (issue 13): a recipe that learns on CPUs.

µSAM finetunes pretrained SAM; from random weights its recipe does not learn in CPU time (measured: the prompt
decoder at input 1024 costs ~0.6 CPU-s per object and Dice + mean BCE collapses to "background everywhere").
This recipe trains at a smaller input size (``image_size`` 256 or 512) in two stages:

* ``stage="ais"``: image encoder + µSAM's AIS (UNETR) decoder, the dense supervision a U-Net gets (a signal at
  every pixel: foreground, centre and boundary distances, torch_em's ``DiceBasedDistanceLoss``, as µSAM's
  ``JointSamTrainer``). With ``ais_crop`` the decoder runs on a block of ``ais_crop`` x ``ais_crop`` embedding
  cells around a random object pixel (its full-resolution layers are the expensive part).
* ``stage="prompts"``: the prompt encoder + mask decoder (and the image encoder with ``train_encoder``) on the
  stage-1 weights, with µSAM's iterative prompting: a point (multimask) or a box per object, then
  ``n_iterations - 1`` rounds of corrective points (one positive, one negative per object from where the
  prediction is wrong) and, with ``mask_prob``, the previous low-res logits as mask prompt; loss per mask
  :func:`balanced_bce` (minimum over the multimask outputs) + MSE of the predicted IoU. The AIS decoder of the
  stage-1 checkpoint is carried into the checkpoints unchanged (the encoder is frozen by default).

Data: each step takes ``batch_size`` random ``image_size`` x ``image_size`` crops at the images' native
resolution (objects keep their pixel scale; a smaller image is placed top-left and padded bottom / right, as
the runtime pads its frame), after µSAM-like augmentation (random flips and 90-degree rotations). Images are
normalised to uint8 as µSAM does (per channel min-max over the whole image) before cropping, then by SAM's
pixel mean / std; padding is 0 in normalised space, as the runtime's.

Determinism and exact resumption: every random draw of step ``k`` comes from ``numpy.random.default_rng((seed,
stage, k))`` (data order, crops, augmentation, objects, prompts), so the data order is a function of the step.
``latest.pt`` (every ``checkpoint_every`` steps and at the end) holds the model, AIS decoder, optimizer and
scheduler states, the step, the accumulated CPU time, the history and the process's python / numpy / torch
random states; a run continued from it gives the same weights as an uninterrupted run (same settings, same
torch thread count). ``best.pt`` is the checkpoint with the best validation metric (``stage="ais"``: the AIS
loss on the validation crops; ``"prompts"``: 1 - mean box IoU). ``history.csv``, ``validation.csv`` and
``curves.png`` are written next to them.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from usam_bioimageio import registry
from usam_bioimageio.modeling import Sam, build_sam
from usam_bioimageio.modeling.unetr import AisDecoder, build_ais_decoder, load_ais_decoder, uses_conv_transpose
from usam_bioimageio.prompting import iterative as ip
from usam_bioimageio.runtime.geometry import to_rgb
from usam_bioimageio.training.checkpoints import load_checkpoint, save_training_checkpoint
from usam_bioimageio.training.targets import distance_targets
from usam_bioimageio.training.trainer import dice_loss, distance_loss

__all__ = ["RecipeConfig", "RecipeTrainer", "balanced_bce", "STAGES", "OUTPUT_FILES"]

STAGES = ("ais", "prompts")
ENCODER_BATCHNORM = ("batch", "frozen")
OUTPUT_FILES = ("best.pt", "latest.pt", "history.csv", "validation.csv", "curves.png")
_STAGE_ID = {"ais": 1, "prompts": 2}
STATE_KEY = "recipe_state"


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    stage: str = "ais"
    model_type: str = "vit_t"
    image_size: int = 256
    steps: int = 1000
    batch_size: int = 1
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 50  # linear warm-up steps, then constant
    seed: int = 0
    device: Optional[str] = None  # default: cuda when available
    checkpoint_every: int = 50
    val_every: int = 100
    ais_crop: Optional[int] = None  # stage ais: decoder on a block of N x N embedding cells (None: all)
    ais_min_size: int = 5
    n_objects: int = 16
    n_iterations: int = 3  # stage prompts: 1 + rounds of corrective points (µSAM: 8)
    mask_prob: float = 0.5
    mask_dice: float = 0.0  # stage prompts: weight of µSAM's Dice loss added to the class-balanced BCE per mask
    box_distortion: Optional[float] = 0.025
    train_encoder: bool = False  # stage prompts: also train the image encoder
    val_objects: int = 16
    # share of training samples in the runtime's frame (the whole image resized so that its longer side is
    # image_size, as `usam ais` / `segment` see an image without tiling); the rest are native-resolution crops.
    # With frame_prob > 0 validation runs in that frame too.
    frame_prob: float = 0.0
    bf16: bool = False  # training steps under bfloat16 autocast (validation and the weights stay float32)
    val_msa: bool = False  # stage ais: select by the AIS mSA of the validation images (runtime frame, µSAM's
    # post-processing, scored at the original size; without frame samples: the validation crops at the training
    # scale) instead of the AIS loss on validation crops
    # how the image encoder's BatchNorm layers (TinyViT's convolutions) normalise while it trains: "batch" with
    # each batch's statistics (torch's training mode; running statistics recalibrated before each validation),
    # "frozen" with running statistics set once by a recalibration when the run starts, then kept: training
    # then sees the normalisation that validation, the packages and stage prompts use. Measured on the "batch"
    # run's step 4000 (16 `val` images): validation AIS loss 0.457 with running statistics, 0.278 with each
    # image's own; a batch of one image trains an encoder that relies on per-image statistics.
    encoder_batchnorm: str = "batch"
    # native-resolution crops (training and validation) are taken from the images enlarged by this factor
    # (bilinear; labels nearest): µSAM's 1024 frame shows a 256-520 px DSB2018 image enlarged 2-4x, so that a
    # nucleus covers many 16 x 16 embedding cells; frame samples are unaffected
    scale: float = 1.0

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not 0.0 <= self.frame_prob <= 1.0:
            raise ValueError(f"frame_prob must be in [0, 1], got {self.frame_prob}")
        if self.encoder_batchnorm not in ENCODER_BATCHNORM:
            raise ValueError(f"encoder_batchnorm must be one of {ENCODER_BATCHNORM}, got {self.encoder_batchnorm!r}")
        if not 1.0 <= self.scale <= 8.0:
            raise ValueError(f"scale must be in [1, 8], got {self.scale}")
        registry.check_image_size(self.image_size)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy per mask: (n, ..., H, W) logits and 0/1 targets -> (n, ...).

    The mean of the per-pixel BCE over the object's pixels plus its mean over the background pixels (a class
    absent from a mask contributes 0). Unlike the mean over all pixels, a small object weighs as much as the
    background around it, so "background everywhere" is no longer a cheap minimum."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(-2)
    fg = target.flatten(-2)
    bg = 1.0 - fg
    fg_mean = (bce * fg).sum(-1) / fg.sum(-1).clamp(min=1.0)
    bg_mean = (bce * bg).sum(-1) / bg.sum(-1).clamp(min=1.0)
    return fg_mean + bg_mean


def _uint8_like_usam(image: np.ndarray) -> np.ndarray:
    """µSAM's per-channel min-max normalisation to uint8 (``modeling.preprocess.usam_to_uint8``), (H, W, 3)."""
    x = to_rgb(np.asarray(image)).astype(np.float32)
    x = x - x.min(axis=(0, 1), keepdims=True)
    x = x / (x.max(axis=(0, 1), keepdims=True) + np.float32(1e-7))
    return np.floor(x * np.float32(255.0)).astype(np.uint8)


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Random horizontal / vertical flip and 90-degree rotation (µSAM's flips and rot90), image (H, W, C)."""
    k = int(rng.integers(4))
    flip_h, flip_v = bool(rng.integers(2)), bool(rng.integers(2))
    image, labels = np.rot90(image, k, axes=(0, 1)), np.rot90(labels, k)
    if flip_h:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if flip_v:
        image, labels = image[::-1], labels[::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def enlarged(image: np.ndarray, labels: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """(H, W, C) uint8 image and (H, W) labels enlarged by ``scale`` (image bilinear, labels nearest neighbour);
    unchanged for scale 1."""
    if scale == 1.0:
        return image, labels
    from scipy import ndimage

    from usam_bioimageio.runtime.pixel_scale import scale_image, scaled_shape

    shape = scaled_shape(labels.shape, scale)
    zoom = (shape[0] / labels.shape[0], shape[1] / labels.shape[1])
    labels = ndimage.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest")
    # the runtime's resize (`usam ais --scale`), then back to uint8 as µSAM's normalisation left it
    return np.clip(np.round(scale_image(image, scale)), 0, 255).astype(np.uint8), labels


def random_crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator,
                tries: int = 10) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int]]:
    """A ``size`` x ``size`` window at native resolution (one holding objects, when ``tries`` allow), its
    labels and the valid (h, w) of the window (smaller images: all of it)."""
    h, w = labels.shape
    ch, cw = min(h, size), min(w, size)
    for _ in range(tries):
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop_labels = labels[y0:y0 + ch, x0:x0 + cw]
        if crop_labels.any():
            break
    return image[y0:y0 + ch, x0:x0 + cw], crop_labels, (ch, cw)


def centre_crop(image: np.ndarray, labels: np.ndarray, size: int):
    h, w = labels.shape
    ch, cw = min(h, size), min(w, size)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return image[y0:y0 + ch, x0:x0 + cw], labels[y0:y0 + ch, x0:x0 + cw], (ch, cw)


@dataclasses.dataclass
class _Crop:
    x: torch.Tensor  # (1, 3, N, N) normalised, zero padded
    labels: np.ndarray  # (N, N) int, zero padded
    valid: Tuple[int, int]


def _to_crop(image_u8: np.ndarray, labels: np.ndarray, valid: Tuple[int, int], size: int) -> _Crop:
    mean = np.asarray(registry.PIXEL_MEAN, np.float32)
    std = np.asarray(registry.PIXEL_STD, np.float32)
    return _padded((image_u8.astype(np.float32) - mean) / std, labels, size)


def _padded(x: np.ndarray, labels: np.ndarray, size: int) -> _Crop:
    """Normalised (h, w, 3) pixels and (h, w) labels, h, w <= size, placed top-left in a zero-padded frame."""
    h, w = labels.shape
    frame = np.zeros((size, size, 3), np.float32)
    frame[:h, :w] = x
    lab = np.zeros((size, size), np.int64)
    lab[:h, :w] = labels
    return _Crop(torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))[None], lab, (h, w))


def runtime_frame(image: np.ndarray, labels: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """An image as the encoder sees it without tiling (µSAM's uint8 normalisation, SAM's Pillow-exact resize of
    the longer side to ``size``, SAM's mean / std; ``modeling.preprocess.SamPreprocess``) without the padding:
    (h', w', 3) float32, and its labels resized to (h', w') by nearest neighbour."""
    from usam_bioimageio.embeddings.compute import image_to_input
    from usam_bioimageio.modeling.preprocess import SamPreprocess
    from usam_bioimageio.runtime.geometry import longest_side_shape

    labels = np.asarray(labels)
    h, w = labels.shape
    new_h, new_w = longest_side_shape(h, w, size)
    with torch.no_grad():
        x = SamPreprocess(size)(torch.from_numpy(image_to_input(image, size)))[0, :, :new_h, :new_w]
    rows = np.minimum(((np.arange(new_h) + 0.5) * h / new_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * w / new_w).astype(np.int64), w - 1)
    return np.ascontiguousarray(x.numpy().transpose(1, 2, 0)), labels[rows][:, cols].astype(np.int64)


def _rng_states() -> Dict:
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: Dict) -> None:
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RecipeTrainer:
    """One stage of the recipe (see the module docstring) over (image, label image) pairs."""

    def __init__(self, train_data: Sequence[Tuple[np.ndarray, np.ndarray]],
                 val_data: Sequence[Tuple[np.ndarray, np.ndarray]] = (), config: RecipeConfig = RecipeConfig(), *,
                 initial_weights: Optional[str] = None, log: Optional[Callable[[str], None]] = print) -> None:
        self.config = cfg = config
        self.log = log or (lambda message: None)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global torch RNG untouched
            torch.manual_seed(cfg.seed)
            sam = build_sam(cfg.model_type, image_size=cfg.image_size)
            decoder = build_ais_decoder(cfg.model_type)
        if initial_weights is not None:
            checkpoint = load_checkpoint(initial_weights, model_type=cfg.model_type)
            if checkpoint.image_size != cfg.image_size:
                raise ValueError(f"{initial_weights} is a model of input size {checkpoint.image_size}, "
                                 f"not {cfg.image_size}")
            sam.load_state_dict(checkpoint.sam_state, strict=True)
            if checkpoint.decoder_state is not None:
                if uses_conv_transpose(checkpoint.decoder_state):
                    decoder = load_ais_decoder(cfg.model_type, checkpoint.decoder_state)
                else:
                    decoder.load_state_dict(dict(checkpoint.decoder_state), strict=True)
            elif cfg.stage == "prompts":
                decoder = None  # nothing to carry
        self.sam: Sam = sam.to(self.device)
        self.ais_decoder: Optional[AisDecoder] = decoder.to(self.device) if decoder is not None else None
        train_encoder = cfg.stage == "ais" or cfg.train_encoder
        for p in self.sam.parameters():
            p.requires_grad_(False)
        params = []
        if train_encoder:
            params += list(self.sam.image_encoder.parameters())
        if cfg.stage == "ais":
            params += list(self.ais_decoder.parameters())
        else:
            params += list(self.sam.prompt_encoder.parameters()) + list(self.sam.mask_decoder.parameters())
            if self.ais_decoder is not None:
                for p in self.ais_decoder.parameters():
                    p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.train_encoder = train_encoder
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))

        def native(image, labels):  # µSAM's uint8 normalisation, at the crops' scale
            return enlarged(_uint8_like_usam(image), np.asarray(labels).astype(np.int64), cfg.scale)

        self.train_images = [native(i, l) for i, l in train_data]
        if not self.train_images:
            raise ValueError("no training images")
        frames = cfg.frame_prob > 0
        self.train_frames = [runtime_frame(i, l, cfg.image_size) for i, l in train_data] if frames else None
        if frames:
            self.val_crops = [_padded(*runtime_frame(i, l, cfg.image_size), cfg.image_size) for i, l in val_data]
        else:
            self.val_crops = [_to_crop(*centre_crop(*native(i, l), cfg.image_size), cfg.image_size) for i, l in val_data]
        if frames:  # at the original size: the frame's maps are resized back, as the runtime does
            self.val_labels = [np.asarray(l) for _, l in val_data]
        else:  # the crops' own labels, at the training scale (a scale-S model runs on images enlarged S times)
            self.val_labels = [c.labels[:c.valid[0], :c.valid[1]] for c in self.val_crops]
        self.step = 0
        self.cpu_seconds = 0.0
        self.best_metric = math.inf
        self.history: List[Dict[str, float]] = []
        self.validation: List[Dict[str, float]] = []

    # ------------------------------------------------------------------------------------------------------
    def _step_rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng((self.config.seed, _STAGE_ID[self.config.stage], step))

    def sample_crops(self, rng: np.random.Generator) -> List[_Crop]:
        cfg = self.config
        crops = []
        for _ in range(cfg.batch_size):
            index = int(rng.integers(len(self.train_images)))
            if self.train_frames is not None and rng.random() < cfg.frame_prob:
                crops.append(_padded(*augment(*self.train_frames[index], rng), cfg.image_size))
                continue
            image, labels = augment(*self.train_images[index], rng)
            crops.append(_to_crop(*random_crop(image, labels, cfg.image_size, rng), cfg.image_size))
        return crops

    def _encode(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        x = x.to(self.device)
        if train:
            self.sam.image_encoder.train()
            if self.config.encoder_batchnorm == "frozen":
                for m in self._encoder_batchnorms():
                    m.eval()
            return self.sam.image_encoder(x)
        self.sam.image_encoder.eval()
        with torch.no_grad():
            return self.sam.image_encoder(x)

    def ais_loss(self, crops: Sequence[_Crop], rng: Optional[np.random.Generator], train: bool) -> torch.Tensor:
        cfg = self.config
        emb = self._encode(torch.cat([c.x for c in crops]), train)
        targets = torch.from_numpy(np.stack([distance_targets(c.labels, min_size=cfg.ais_min_size)
                                             for c in crops])).to(self.device)
        cells = emb.shape[-1]
        patch = cfg.image_size // cells
        crop = cfg.ais_crop if (cfg.ais_crop is not None and rng is not None) else None
        if crop is None or crop >= cells:
            self.ais_decoder.train(train)
            return distance_loss(self.ais_decoder(emb).float(), targets)
        blocks, block_targets = [], []
        for k, c in enumerate(crops):
            valid = [-(-v // patch) for v in c.valid]
            fg = np.argwhere(targets[k, 0].cpu().numpy() > 0)
            if len(fg):
                y, x = fg[int(rng.integers(len(fg)))] // patch
                y0, x0 = (min(max(0, v - crop // 2), max(0, n - crop)) for v, n in zip((int(y), int(x)), valid))
            else:
                y0, x0 = (int(rng.integers(0, max(0, n - crop) + 1)) for n in valid)
            blocks.append(emb[k:k + 1, :, y0:y0 + crop, x0:x0 + crop])
            block_targets.append(targets[k:k + 1, :, y0 * patch:(y0 + crop) * patch, x0 * patch:(x0 + crop) * patch])
        self.ais_decoder.train(train)
        maps = self.ais_decoder(torch.cat(blocks))
        return distance_loss(maps.float(), torch.cat(block_targets))

    def _decode(self, emb: torch.Tensor, prompts: Dict, multimask: bool):
        points = (prompts["points"], prompts["labels"]) if "points" in prompts else None
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=prompts.get("boxes"),
                                                masks=prompts.get("mask_inputs"))
        low_res, iou = self.sam.mask_decoder(image_embeddings=emb, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask)
        n = self.config.image_size
        low_res, iou = low_res.float(), iou.float()
        return self.sam.postprocess_masks(low_res, (n, n), (n, n)), low_res, iou

    def _tensor(self, a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)

    def prompt_loss(self, crops: Sequence[_Crop], rng: np.random.Generator, use_boxes: bool):
        """(loss, mask loss, IoU loss, mean IoU) of µSAM's iterative prompting on the batch."""
        cfg = self.config
        emb = self._encode(torch.cat([c.x for c in crops]), self.train_encoder)
        self.sam.prompt_encoder.train(), self.sam.mask_decoder.train()
        total_mask, total_iou, last_iou = 0.0, 0.0, []
        for k, c in enumerate(crops):
            ids = ip.sample_object_ids(c.labels, cfg.n_objects, rng)
            if len(ids) == 0:
                continue
            gt = ip.object_masks(c.labels, ids)
            target = self._tensor(gt)
            prompts: Dict = {}
            if use_boxes:
                prompts["boxes"] = self._tensor(ip.starting_boxes(gt, rng, cfg.box_distortion))
            else:
                coords, labels = ip.starting_points(gt, rng)
                prompts["points"], prompts["labels"] = self._tensor(coords), self._tensor(labels, torch.int64)
            for it in range(cfg.n_iterations):
                multimask = (not use_boxes) and it == 0
                masks, low_res, iou_pred = self._decode(emb[k:k + 1], prompts, multimask)
                expanded = target[:, None].expand_as(masks)
                mask_loss = balanced_bce(masks, expanded)  # (n, m)
                if cfg.mask_dice:
                    mask_loss = mask_loss + cfg.mask_dice * dice_loss(torch.sigmoid(masks).flatten(0, 1),
                                                                      expanded.flatten(0, 1)).view(mask_loss.shape)
                with torch.no_grad():
                    binary = masks > 0
                    t = target.bool()[:, None]
                    true_iou = (binary & t).flatten(2).sum(-1) / (binary | t).flatten(2).sum(-1).clamp(min=1)
                total_mask = total_mask + mask_loss.min(dim=1).values.mean() / cfg.n_iterations
                total_iou = total_iou + F.mse_loss(iou_pred, true_iou) / cfg.n_iterations
                best = iou_pred.argmax(dim=1)
                idx = torch.arange(len(best), device=best.device)
                if it == cfg.n_iterations - 1:
                    last_iou.append(float(true_iou[idx, best].mean()))
                    break
                with torch.no_grad():
                    pred = (masks[idx, best] > 0).cpu().numpy()
                    coords, labels = ip.corrective_points(gt, pred, rng)
                    new_points, new_labels = self._tensor(coords), self._tensor(labels, torch.int64)
                    if "points" in prompts:
                        prompts["points"] = torch.cat([prompts["points"], new_points], 1)
                        prompts["labels"] = torch.cat([prompts["labels"], new_labels], 1)
                    else:
                        prompts["points"], prompts["labels"] = new_points, new_labels
                    if cfg.mask_prob > 0 and rng.random() < cfg.mask_prob:
                        prompts["mask_inputs"] = low_res[idx, best][:, None].detach()
                    else:
                        prompts.pop("mask_inputs", None)
        if not last_iou:
            return None
        n = len(last_iou)
        mask_loss, iou_loss = total_mask / n, total_iou / n
        return mask_loss + iou_loss, mask_loss, iou_loss, float(np.mean(last_iou))

    def train_step(self) -> Dict[str, float]:
        rng = self._step_rng(self.step)
        crops = self.sample_crops(rng)
        self.optimizer.zero_grad()
        out: Dict[str, float] = {"step": self.step + 1}
        # bf16: the forward pass under autocast (matmuls and convolutions in bfloat16: 1.65x faster steps of
        # stage ais on 2 CPU cores with AVX512-BF16, measured); weights, gradients and the optimiser in float32
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)
        if self.config.stage == "ais":
            with autocast:
                loss = self.ais_loss(crops, rng, train=True)
            out["ais_loss"] = float(loss.detach())
        else:
            with autocast:
                result = self.prompt_loss(crops, rng, use_boxes=self.step % 2 == 1)
            if result is None:
                loss = None
            else:
                loss, mask_loss, iou_loss, train_iou = result
                out.update(prompt="box" if self.step % 2 == 1 else "point", mask_loss=float(mask_loss.detach()),
                           iou_loss=float(iou_loss.detach()), train_iou=train_iou)
        if loss is not None:
            loss.backward()
            self.optimizer.step()
            out["loss"] = float(loss.detach())
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        return out

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Stage ais: the AIS loss on the validation crops; stage prompts: the mean IoU of one box and of one
        point per object (best of three masks by predicted IoU), objects drawn from a fixed generator."""
        cfg = self.config
        out: Dict[str, float] = {"step": self.step}
        if self.ais_decoder is not None and self.train_encoder:  # else unchanged since stage ais
            if cfg.encoder_batchnorm == "batch":
                self.recalibrate_batchnorm()
            out["val_ais_loss"] = float(np.mean([float(self.ais_loss([c], None, train=False)) for c in self.val_crops]))
            if cfg.val_msa:
                out["val_ais_msa"] = self.validation_ais_msa()
        if cfg.stage == "prompts":
            rng = np.random.default_rng((cfg.seed, 99))
            box_iou, point_iou = [], []
            self.sam.eval()
            for c in self.val_crops:
                ids = ip.sample_object_ids(c.labels, cfg.val_objects, rng)
                if len(ids) == 0:
                    continue
                gt = ip.object_masks(c.labels, ids)
                t = self._tensor(gt).bool()
                emb = self._encode(c.x, False)
                for kind, store in (("box", box_iou), ("point", point_iou)):
                    if kind == "box":
                        prompts = {"boxes": self._tensor(ip.bounding_boxes(gt).astype(np.float32))}
                    else:
                        coords, labels = ip.starting_points(gt, rng)
                        prompts = {"points": self._tensor(coords), "labels": self._tensor(labels, torch.int64)}
                    masks, _, iou = self._decode(emb, prompts, multimask=kind == "point")
                    best = masks[torch.arange(len(masks)), iou.argmax(1)] > 0
                    store.extend(((best & t).flatten(1).sum(-1) / (best | t).flatten(1).sum(-1).clamp(min=1)).tolist())
            out["val_box_iou"] = float(np.mean(box_iou)) if box_iou else math.nan
            out["val_point_iou"] = float(np.mean(point_iou)) if point_iou else math.nan
            out["metric"] = 1.0 - out["val_box_iou"]
        else:
            out["metric"] = 1.0 - out["val_ais_msa"] if cfg.val_msa else out["val_ais_loss"]
        return out

    def _encoder_batchnorms(self) -> List[torch.nn.Module]:
        return [m for m in self.sam.image_encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def recalibrate_batchnorm(self, samples: int = 32) -> None:
        """Set the image encoder's BatchNorm running statistics (TinyViT's convolutions) to their mean over
        ``samples`` training samples (a fixed draw), as training normalises them: one image per batch.

        Training normalises with each batch's statistics; evaluation, the exported packages and stage prompts
        use the running statistics, whose exponential average lags far behind an encoder trained from scratch
        (measured: validation foreground IoU 0.11 with them, 0.30 with batch statistics, after 300 steps)."""
        norms = self._encoder_batchnorms()
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        self.sam.image_encoder.train()
        rng = np.random.default_rng((self.config.seed, 77))
        for _ in range(samples):
            self.sam.image_encoder(torch.cat([c.x for c in self.sample_crops(rng)]).to(self.device))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.sam.image_encoder.eval()

    @torch.no_grad()
    def validation_ais_msa(self) -> float:
        """Mean mSA of µSAM's AIS on the validation images: each in the runtime frame (``val_crops``), the whole
        decoder, the maps resized to the original size, µSAM's default post-processing, scored against the
        original labels. Without frame samples (``frame_prob`` 0): on the validation crops (centre crops at the
        training scale), scored against their labels."""
        from usam_bioimageio.automatic.ais.postprocess import instances_from_maps
        from usam_bioimageio.evaluation.metrics import segmentation_scores
        from usam_bioimageio.modeling.unetr import maps_to_original

        self.ais_decoder.eval()
        scores = []
        for crop, gt in zip(self.val_crops, self.val_labels):
            maps = self.ais_decoder(self._encode(crop.x, False))
            if self.train_frames is not None:
                maps = maps_to_original(maps.cpu(), torch.zeros(gt.shape))[0].numpy()
            else:
                maps = maps.cpu()[0, :, :crop.valid[0], :crop.valid[1]].numpy()
            scores.append(segmentation_scores(instances_from_maps(maps), gt)["msa"])
        return float(np.mean(scores))

    # ------------------------------------------------------------------------------------------------------
    def state(self) -> Dict:
        return {"stage": self.config.stage, "config": dataclasses.asdict(self.config), "step": self.step,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "cpu_seconds": self.cpu_seconds, "best_metric": self.best_metric, "history": self.history,
                "validation": self.validation, "rng": _rng_states(),
                "data_order": "numpy.random.default_rng((seed, stage, step)) per step"}

    def save(self, path: Path) -> Path:
        decoder = self.ais_decoder.state_dict() if self.ais_decoder is not None else None
        return save_training_checkpoint(path, sam_state=self.sam.state_dict(), decoder_state=decoder,
                                        image_size=self.config.image_size, pixel_scale=self.config.scale,
                                        model_type=self.config.model_type,
                                        iteration=self.step, best_metric=self.best_metric, **{STATE_KEY: self.state()})

    def resume(self, path: Path) -> None:
        """Continue from ``latest.pt`` of this stage (model, decoder, optimizer, scheduler, step, RNG states)."""
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = raw.get(STATE_KEY)
        if state is None or state.get("stage") != self.config.stage:
            raise ValueError(f"{path} is not a checkpoint of a {self.config.stage!r} stage run")
        checkpoint = load_checkpoint(path, model_type=self.config.model_type)
        self.sam.load_state_dict(checkpoint.sam_state, strict=True)
        if checkpoint.decoder_state is not None and self.ais_decoder is not None:
            self.ais_decoder.load_state_dict(dict(checkpoint.decoder_state), strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.cpu_seconds, self.best_metric = int(state["step"]), float(state["cpu_seconds"]), float(state["best_metric"])
        self.history, self.validation = list(state["history"]), list(state["validation"])
        _set_rng_states(state["rng"])

    def write_curves(self, folder: Path) -> None:
        folder = Path(folder)
        for name, rows in (("history.csv", self.history), ("validation.csv", self.validation)):
            keys: List[str] = []
            for r in rows:
                keys += [k for k in r if k not in keys]
            with open(folder / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
        plot_curves(self.history, self.validation, folder / "curves.png",
                    title=f"stage {self.config.stage}, {self.config.model_type} at {self.config.image_size}")

    def fit(self, output: Optional[Path] = None, progress: bool = True) -> "RecipeTrainer":
        cfg = self.config
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"stage {cfg.stage}", disable=not progress,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        if cfg.encoder_batchnorm == "frozen" and self.train_encoder and self.step == 0:
            self.recalibrate_batchnorm()  # the statistics the whole run normalises with (a resumed run loads them)
        try:
            while self.step < cfg.steps:
                c0 = time.process_time()
                out = self.train_step()
                self.cpu_seconds += time.process_time() - c0
                out["cpu_seconds"] = self.cpu_seconds
                self.history.append(out)
                bar.update(1)
                if "loss" in out:
                    bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
                last = self.step == cfg.steps
                if self.val_crops and (self.step % cfg.val_every == 0 or last):
                    c0 = time.process_time()
                    val = self.validate()
                    self.cpu_seconds += time.process_time() - c0
                    val["cpu_seconds"] = self.cpu_seconds
                    self.validation.append(val)
                    self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "step"))
                    if val["metric"] < self.best_metric:
                        self.best_metric = val["metric"]
                        if output is not None:
                            self.save(Path(output) / "best.pt")
                if output is not None and (self.step % cfg.checkpoint_every == 0 or last):
                    self.save(Path(output) / "latest.pt")
                    self.write_curves(output)
        finally:
            bar.close()
        return self


def plot_curves(history: Sequence[Dict], validation: Sequence[Dict], path: Path, title: str = "") -> Path:
    """Training losses (raw and a running mean over 25 steps) and validation metrics against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "ais_loss", "mask_loss", "iou_loss", "train_iou"):
        pts = [(h["step"], h[key]) for h in history if key in h and h[key] == h[key]]
        if not pts or (key == "ais_loss" and any("mask_loss" in h for h in history)):
            continue
        if key == "loss" and any("mask_loss" in h for h in history):
            continue
        x, y = np.array(pts).T
        line, = axes[0].plot(x, y, alpha=0.25)
        k = min(25, len(y))
        axes[0].plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color=line.get_color(), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("training")
    axes[0].legend()
    for key in ("val_ais_loss", "val_ais_msa", "val_box_iou", "val_point_iou"):
        pts = [(v["step"], v[key]) for v in validation if key in v and v[key] == v[key]]
        if pts:
            x, y = np.array(pts).T
            axes[1].plot(x, y, marker="o", label=key)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation")
    if validation:
        axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
