"""Finetuning SAM with µSAM's iterative prompting (micro_sam 1.8.14 ``training.SamTrainer``), in plain torch.

One training step takes a batch of images and, per image, up to ``n_objects`` ground-truth objects
(the same number in every image of the batch: the minimum, as µSAM's ``_preprocess_batch``):

* Step ``k`` even: one positive point per object and three mask outputs; ``k`` odd: one (optionally
  distorted) box per object and one mask output (``_get_prompt_and_multimasking_choices``).
* ``n_iterations`` sub-iterations (µSAM's ``n_sub_iteration``, 8 by default in ``train_sam``). In each, the
  decoder predicts masks (multimask only in the first), the loss is computed, and (except after the last)
  the best mask per object *by predicted IoU* is binarised at logit 0; one positive and one negative
  correction point are appended to the object's prompts (:func:`.iterative_prompting.corrective_points`,
  the box stays); with probability ``mask_prob`` (0.5), per image and sub-iteration, that mask's low-res
  logits are the next mask prompt, else there is none.
* Loss per sub-iteration: Dice loss (torch_em ``DiceLoss(reduce_channel=None)``: ``1 - 2 sum(p t) /
  (sum(p^2) + sum(t^2))`` on sigmoid probabilities at the original size, per object), the *minimum* over the
  1 or 3 masks, averaged over objects; plus the MSE between the predicted IoUs (all 1 or 3) and the true
  IoUs of the masks (``sigmoid > 0.5``). Both averaged over the batch, summed, then averaged over sub-iterations.
* Validation metric: the Dice loss as above (lower is better), one-shot prompts cycling point (multimask),
  box, points, box + points per validation image like ``_get_prompt_and_multimasking_choices_for_val``,
  drawn from a generator reseeded for every validation so the metric is comparable between epochs; also
  the mean IoU of the best mask (by predicted IoU).
* Adam (lr 1e-5), ``ReduceLROnPlateau(mode="min", factor=0.9, patience=3)`` stepped with the validation
  metric, early stopping after ``early_stopping`` (10) validations without improvement; ``best.pt`` and
  ``latest.pt`` written in µSAM's checkpoint layout (``{"model_state": {"sam.<key>": tensor}, ...}``).

Differences from µSAM, on purpose: prompts are drawn from a seeded ``numpy.random.Generator`` (deterministic),
images are preprocessed by the runtime's :class:`~usam_bioimageio.modeling.preprocess.SamPreprocess` (µSAM's
inference preprocessing, so embeddings equal the runtime's) instead of ``ResizeLongestSide.apply_image_torch``
on unnormalised images, and with a frozen image encoder (the default here; µSAM's ``freeze=["image_encoder"]``)
the embeddings are computed once per image.

Joint AIS decoder training (µSAM's ``JointSamTrainer``, on by default as in µSAM's ``train_sam``): after the
interactive step, a second optimiser step on the UNETR decoder's loss: the decoder's maps for the batch's
embeddings, cropped and resized to each image (``UNETR.postprocess_masks``), against the
:func:`.targets.distance_targets` of its labels (objects below ``ais_min_size`` removed), with torch_em's
``DiceBasedDistanceLoss(mask_distances_in_bg=True)``: Dice loss of the foreground plus Dice losses of both
distance maps multiplied by the foreground target. The validation metric adds a third of that loss on the
validation images, as µSAM does. Checkpoints then carry ``decoder_state`` (µSAM's layout), so the exporter
writes the AIS packages too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from usam_bioimageio import registry
from usam_bioimageio.modeling import Sam, build_sam
from usam_bioimageio.modeling.preprocess import SamPreprocess
from usam_bioimageio.modeling.unetr import AisDecoder, build_ais_decoder, maps_to_original
from usam_bioimageio.runtime.geometry import longest_side_shape, to_rgb
from usam_bioimageio.prompting import iterative as ip
from usam_bioimageio.training.checkpoints import load_checkpoint, save_training_checkpoint
from usam_bioimageio.training.targets import distance_targets

__all__ = ["TrainConfig", "Trainer", "dice_loss", "distance_loss", "read_pairs", "train"]



@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_type: str = "vit_b"
    image_size: int = registry.IMAGE_SIZE  # the encoder's input side (registry.IMAGE_SIZES)
    n_iterations: int = 8  # µSAM train_sam's n_sub_iteration
    n_objects: int = 25  # µSAM's n_objects_per_batch
    batch_size: int = 1
    mask_prob: float = 0.5
    box_distortion: Optional[float] = 0.025
    lr: float = 1e-5
    epochs: int = 10
    steps_per_epoch: Optional[int] = None  # default: one pass over the training images
    early_stopping: Optional[int] = 10
    scheduler_factor: float = 0.9
    scheduler_patience: int = 3
    freeze_encoder: bool = True
    device: Optional[str] = None  # default: cuda when available
    seed: int = 0
    train_ais_decoder: bool = True  # µSAM's with_segmentation_decoder
    ais_conv_transpose: bool = False  # µSAM's default UNETR upsampling (interpolation)
    ais_min_size: int = 0  # µSAM's train_sam min_size for the distance targets
    # CPU settings (not µSAM's): the AIS loss on a random ais_crop x ais_crop block of embedding cells (its
    # 16 ais_crop-pixel square of SAM's frame) instead of the whole frame, and one optimiser step on the sum
    # of both losses instead of two steps (one encoder pass per image when the encoder is trained)
    ais_crop: Optional[int] = None
    ais_separate_step: bool = True
    # Training from scratch (not µSAM's, which finetunes pretrained SAM with Dice alone): weight of a per-pixel
    # binary cross-entropy added to each mask's Dice loss. Dice alone drives a random decoder to logits of about
    # -5 everywhere (the quickest way to shrink sum(p^2) around small objects), where sigmoid gradients vanish
    # and masks never form; BCE's gradient (p - t) does not vanish. SAM itself was trained with focal + Dice.
    mask_bce: float = 0.0


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """torch_em ``DiceLoss(reduce_channel=None)`` per object: (n, H, W) probabilities and targets -> (n,)."""
    p = probs.flatten(1)
    t = target.flatten(1)
    return 1.0 - 2.0 * (p * t).sum(-1) / ((p * p).sum(-1) + (t * t).sum(-1)).clamp(min=eps)


def _dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """torch_em ``dice_score`` of a one-channel input (channelwise, summed over channels) as a loss: the
    per-object :func:`dice_loss` with the whole batch as one object."""
    return dice_loss(probs.reshape(1, -1), target.reshape(1, -1))[0]


def distance_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torch_em ``DiceBasedDistanceLoss(mask_distances_in_bg=True)``: (B, 3, H, W) maps and targets -> scalar."""
    if maps.shape != targets.shape or maps.shape[1] != 3:
        raise ValueError(f"maps and targets must both be (B, 3, H, W), got {tuple(maps.shape)} and {tuple(targets.shape)}")
    fg = targets[:, 0:1]
    return (_dice(maps[:, 0:1], fg) + _dice(maps[:, 1:2] * fg, targets[:, 1:2] * fg)
            + _dice(maps[:, 2:3] * fg, targets[:, 2:3] * fg))


@dataclasses.dataclass
class _Sample:
    labels: np.ndarray  # (H, W) int
    image: torch.Tensor  # (1, 3, H, W) raw RGB (preprocessed per use)
    embedding: Optional[torch.Tensor]  # (1, 256, 64, 64): with a frozen encoder, computed at first use
    input_size: Tuple[int, int]
    targets: Optional[torch.Tensor] = None  # (1, 3, H, W) AIS decoder targets, when it is trained


def _to_tensor_sample(image: np.ndarray, labels: np.ndarray, device, ais_min_size: Optional[int] = None,
                      image_size: int = registry.IMAGE_SIZE) -> _Sample:
    labels = np.asarray(labels)
    rgb = to_rgb(np.asarray(image))
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image {rgb.shape[:2]} and labels {labels.shape} differ in size")
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(torch.float32)[None]
    input_size = longest_side_shape(*labels.shape, image_size)
    targets = None
    if ais_min_size is not None:
        targets = torch.from_numpy(distance_targets(labels, min_size=ais_min_size))[None].to(device)
    # kept raw: 451 DSB2018 images preprocessed to 1024 x 1024 float32 would hold 5.7 GB
    return _Sample(labels.astype(np.int64), x, None, input_size, targets)


class Trainer:
    """Iterative-prompting finetuning of a :class:`Sam` on (image, label image) pairs."""

    def __init__(self, sam: Sam, train_data: Sequence[Tuple[np.ndarray, np.ndarray]],
                 val_data: Sequence[Tuple[np.ndarray, np.ndarray]] = (), config: TrainConfig = TrainConfig(),
                 log: Optional[Callable[[str], None]] = print, ais_decoder: Optional[AisDecoder] = None,
                 carried_decoder_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self.config = config
        self.log = log or (lambda message: None)
        # seeded generators of its own: the process's global random state is left as it was
        self.rng = np.random.default_rng(config.seed)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.sam = sam.to(self.device)
        for p in self.sam.image_encoder.parameters():
            p.requires_grad_(not config.freeze_encoder)
        self.ais_decoder: Optional[AisDecoder] = None
        if config.train_ais_decoder:
            if ais_decoder is None:
                with torch.random.fork_rng(devices=[]):  # seeded initial weights, global torch RNG untouched
                    torch.manual_seed(config.seed)
                    ais_decoder = build_ais_decoder(config.model_type, use_conv_transpose=config.ais_conv_transpose)
            self.ais_decoder = ais_decoder.to(self.device)
        elif ais_decoder is not None:
            raise ValueError("an ais_decoder was given, but config.train_ais_decoder is False")
        if carried_decoder_state is not None and (self.ais_decoder is not None or not config.freeze_encoder):
            raise ValueError("an AIS decoder state is carried into the checkpoints only when neither it nor the "
                             "encoder is trained (it would no longer match the encoder)")
        self.carried_decoder_state = carried_decoder_state
        min_size = config.ais_min_size if self.ais_decoder is not None else None
        if sam.image_encoder.img_size != config.image_size:
            raise ValueError(f"the model takes {sam.image_encoder.img_size} x {sam.image_encoder.img_size} inputs, "
                             f"config.image_size is {config.image_size}")
        self.train_samples = [_to_tensor_sample(i, l, self.device, min_size, config.image_size)
                              for i, l in train_data]
        self.val_samples = [_to_tensor_sample(i, l, self.device, min_size, config.image_size)
                            for i, l in val_data]
        if not self.train_samples:
            raise ValueError("no training images")
        params = [p for p in self.sam.parameters() if p.requires_grad]
        if self.ais_decoder is not None:
            params += list(self.ais_decoder.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.scheduler_factor, patience=config.scheduler_patience)
        self.iteration = 0
        self.epoch = 0
        self.best_metric = math.inf
        self.history: List[Dict[str, float]] = []

    # ------------------------------------------------------------------------------------------------------
    def _embedding(self, sample: _Sample) -> torch.Tensor:
        if sample.embedding is not None:
            return sample.embedding
        x = SamPreprocess(self.config.image_size)(sample.image).to(self.device)
        if not self.config.freeze_encoder:
            return self.sam.image_encoder(x)
        encoder, training = self.sam.image_encoder, self.sam.image_encoder.training
        try:  # frozen: once per image, when first used (not all at start: 2 s each on a CPU), in eval mode
            encoder.eval()  # (BatchNorm with its running statistics, as at inference)
            with torch.no_grad():
                sample.embedding = encoder(x)
        finally:
            encoder.train(training)
        return sample.embedding

    def _scale(self, coords: np.ndarray, sample: _Sample) -> torch.Tensor:
        h, w = sample.labels.shape
        new_h, new_w = sample.input_size
        scaled = np.array(coords, np.float64)
        scaled[..., 0] *= new_w / w
        scaled[..., 1] *= new_h / h
        return torch.as_tensor(scaled, dtype=torch.float32, device=self.device)

    def _decode(self, embedding, sample: _Sample, prompts: Dict, multimask: bool):
        points = (prompts["points"], prompts["labels"]) if "points" in prompts else None
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=prompts.get("boxes"),
                                                masks=prompts.get("mask_inputs"))
        low_res, iou = self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask)
        masks = self.sam.postprocess_masks(low_res, sample.input_size, sample.labels.shape)
        return masks, low_res, iou

    def _loss(self, masks: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor):
        probs = torch.sigmoid(masks)  # (n, m, H, W)
        per_mask = torch.stack([dice_loss(probs[:, i], target) for i in range(probs.shape[1])])  # (m, n)
        if self.config.mask_bce:
            bce = F.binary_cross_entropy_with_logits(masks, target[:, None].expand_as(masks), reduction="none")
            per_mask = per_mask + self.config.mask_bce * bce.flatten(2).mean(2).T
        mask_loss = per_mask.min(dim=0).values.mean()
        with torch.no_grad():
            binary = probs > 0.5
            t = target.bool()[:, None]
            true_iou = (binary & t).flatten(2).sum(-1) / ((binary | t).flatten(2).sum(-1) + 1e-7)
        return mask_loss, F.mse_loss(iou_pred, true_iou)

    def _initial_prompts(self, sample: _Sample, masks_np: np.ndarray, use_points: bool, use_boxes: bool,
                         n_pos: int = 1, n_neg: int = 0) -> Dict:
        prompts: Dict = {}
        if use_boxes:
            boxes = ip.starting_boxes(masks_np, self.rng, self.config.box_distortion)
            prompts["boxes"] = self._scale(boxes.reshape(-1, 2, 2), sample).reshape(-1, 4)
        if use_points:
            coords, labels = [], []
            for _ in range(n_pos):
                c, l = ip.starting_points(masks_np, self.rng)
                coords.append(c), labels.append(l)
            for _ in range(n_neg):  # validation only: background points near the object
                c, _ = ip.corrective_points(masks_np, np.zeros_like(masks_np), self.rng)
                coords.append(c[:, 1:]), labels.append(np.zeros((len(masks_np), 1), np.int64))
            prompts["points"] = self._scale(np.concatenate(coords, 1), sample)
            prompts["labels"] = torch.as_tensor(np.concatenate(labels, 1), device=self.device)
        return prompts

    def _batch_objects(self, samples: Sequence[_Sample]) -> List[np.ndarray]:
        ids = [ip.sample_object_ids(s.labels, self.config.n_objects, self.rng) for s in samples]
        n = min(len(i) for i in ids)
        return [ip.object_masks(s.labels, i[:n]) for s, i in zip(samples, ids)]

    def iterative_loss(self, samples: Sequence[_Sample], use_boxes: bool, embeddings: Optional[List[torch.Tensor]] = None):
        """(loss, mask loss, IoU loss) of one batch, averaged over ``n_iterations`` sub-iterations."""
        cfg = self.config
        all_masks = self._batch_objects(samples)
        if all_masks[0].shape[0] == 0:
            return None
        if embeddings is None:
            embeddings = [self._embedding(s) for s in samples]
        prompts = [self._initial_prompts(s, m, not use_boxes, use_boxes) for s, m in zip(samples, all_masks)]
        targets = [torch.as_tensor(m, dtype=torch.float32, device=self.device) for m in all_masks]
        total, total_mask, total_iou = 0.0, 0.0, 0.0
        for it in range(cfg.n_iterations):
            multimask = (not use_boxes) and it == 0
            mask_loss, iou_loss = 0.0, 0.0
            outputs = []
            for emb, s, p, t in zip(embeddings, samples, prompts, targets):
                masks, low_res, iou = self._decode(emb, s, p, multimask)
                ml, il = self._loss(masks, iou, t)
                mask_loss, iou_loss = mask_loss + ml, iou_loss + il
                outputs.append((masks, low_res, iou))
            mask_loss, iou_loss = mask_loss / len(samples), iou_loss / len(samples)
            total, total_mask, total_iou = total + mask_loss + iou_loss, total_mask + mask_loss, total_iou + iou_loss
            if it < cfg.n_iterations - 1:
                with torch.no_grad():
                    for (masks, low_res, iou), s, p, gt in zip(outputs, samples, prompts, all_masks):
                        best = iou.argmax(dim=1)
                        idx = torch.arange(len(best), device=best.device)
                        pred = (masks[idx, best] > 0).cpu().numpy()
                        coords, labels = ip.corrective_points(gt, pred, self.rng)
                        new_points = self._scale(coords, s)
                        new_labels = torch.as_tensor(labels, device=self.device)
                        if "points" in p:
                            p["points"] = torch.cat([p["points"], new_points], 1)
                            p["labels"] = torch.cat([p["labels"], new_labels], 1)
                        else:
                            p["points"], p["labels"] = new_points, new_labels
                        if cfg.mask_prob > 0 and self.rng.random() < cfg.mask_prob:
                            p["mask_inputs"] = low_res[idx, best][:, None].detach()
                        else:
                            p.pop("mask_inputs", None)
        n = cfg.n_iterations
        return total / n, total_mask / n, total_iou / n

    def ais_loss(self, samples: Sequence[_Sample], embeddings: Optional[List[torch.Tensor]] = None,
                 rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """The AIS decoder's loss on a batch (one decoder call: BatchNorm statistics over the batch).

        With ``config.ais_crop``: on one block of embedding cells per image against the targets resized to the
        frame, cropped alike. The block is centred on a foreground pixel drawn from ``rng`` (anywhere inside the
        image's part of the frame when there is none) and kept inside that part when it fits: a block without
        objects has a constant loss (torch_em's Dice of empty targets) and teaches nothing."""
        if embeddings is None:
            embeddings = [self._embedding(s) for s in samples]
        crop = self.config.ais_crop
        if crop is None:
            maps = self.ais_decoder(torch.cat(embeddings))
            losses = [distance_loss(maps_to_original(maps[k:k + 1], s.targets), s.targets)
                      for k, s in enumerate(samples)]
            return torch.stack(losses).mean()
        rng = rng if rng is not None else self.rng
        blocks, targets = [], []
        for emb, s in zip(embeddings, samples):
            patch = self.config.image_size // emb.shape[-1]  # frame pixels per embedding cell
            cells = [-(-n // patch) for n in s.input_size]  # cells the image covers
            fg = torch.nonzero(s.targets[0, 0] > 0)
            if len(fg):
                y, x = fg[int(rng.integers(len(fg)))].tolist()
                centre = [int(v * n / o) // patch for v, n, o in zip((y, x), s.input_size, s.targets.shape[-2:])]
                y0, x0 = (min(max(0, c - crop // 2), max(0, n - crop)) for c, n in zip(centre, cells))
            else:
                y0, x0 = (int(rng.integers(0, max(0, c - crop) + 1)) for c in cells)
            blocks.append(emb[..., y0:y0 + crop, x0:x0 + crop])
            frame = F.pad(F.interpolate(s.targets, s.input_size, mode="bilinear", align_corners=False),
                          (0, self.config.image_size - s.input_size[1], 0, self.config.image_size - s.input_size[0]))
            targets.append(frame[..., y0 * patch:(y0 + crop) * patch, x0 * patch:(x0 + crop) * patch])
        maps = self.ais_decoder(torch.cat(blocks))
        return torch.stack([distance_loss(maps[k:k + 1], t) for k, t in enumerate(targets)]).mean()

    def train_step(self, samples: Sequence[_Sample]) -> Optional[Dict[str, float]]:
        self.sam.train()
        use_boxes = self.iteration % 2 == 1
        self.optimizer.zero_grad()
        joint = self.ais_decoder is not None and not self.config.ais_separate_step
        embeddings = [self._embedding(s) for s in samples] if joint else None
        result = self.iterative_loss(samples, use_boxes, embeddings)
        self.iteration += 1
        if result is None:  # no objects in one of the images
            return None
        loss, mask_loss, iou_loss = result
        out = {"loss": float(loss.detach()), "mask_loss": float(mask_loss.detach()), "iou_loss": float(iou_loss.detach())}
        if joint:  # one step on the sum of both losses
            self.ais_decoder.train()
            ais = self.ais_loss(samples, embeddings)
            (loss + ais).backward()
            self.optimizer.step()
            out["ais_loss"] = float(ais.detach())
            return out
        loss.backward()
        self.optimizer.step()
        if self.ais_decoder is not None:  # µSAM: a second step for the automatic instance segmentation
            self.ais_decoder.train()
            self.optimizer.zero_grad()
            ais = self.ais_loss(samples)
            ais.backward()
            self.optimizer.step()
            out["ais_loss"] = float(ais.detach())
        return out

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Dice loss (the metric, lower is better) and mean IoU on the validation images; one-shot prompts."""
        self.sam.eval()
        saved_rng, self.rng = self.rng, np.random.default_rng(self.config.seed + 1)
        dice, ious = [], []
        try:
            for k, s in enumerate(self.val_samples):
                masks_np = self._batch_objects([s])[0]
                if len(masks_np) == 0:
                    continue
                mode = k % 4
                n_pos, n_neg = 1, 0
                if mode >= 2:
                    n_pos = int(self.rng.integers(1, 5))
                    n_neg = int(self.rng.integers(1 if (n_pos == 1 and mode == 2) else 0, 5))
                prompts = self._initial_prompts(s, masks_np, mode != 1, mode in (1, 3), n_pos, n_neg)
                masks, _, iou = self._decode(self._embedding(s), s, prompts, multimask=mode == 0)
                target = torch.as_tensor(masks_np, dtype=torch.float32, device=self.device)
                mask_loss, _ = self._loss(masks, iou, target)
                dice.append(float(mask_loss))
                best = masks[torch.arange(len(masks)), iou.argmax(1)] > 0
                t = target.bool()
                ious.extend(((best & t).flatten(1).sum(-1) / (best | t).flatten(1).sum(-1).clamp(min=1)).tolist())
        finally:
            self.rng = saved_rng
        out = {"metric": float(np.mean(dice)) if dice else math.nan, "mean_iou": float(np.mean(ious)) if ious else math.nan}
        if self.ais_decoder is not None and self.val_samples:
            self.ais_decoder.eval()
            rng = np.random.default_rng(self.config.seed + 2)  # the same crops in every validation
            ais = float(np.mean([float(self.ais_loss([s], rng=rng)) for s in self.val_samples]))
            out["ais_loss"] = ais
            out["metric"] = out["metric"] + ais / 3  # µSAM's JointSamTrainer: metric + instance metric / 3
        return out

    def fit(self, checkpoint_dir: Optional[Path] = None) -> List[Dict[str, float]]:
        cfg = self.config
        steps = cfg.steps_per_epoch or math.ceil(len(self.train_samples) / cfg.batch_size)
        since_best = 0
        for epoch in range(cfg.epochs):
            self.epoch = epoch
            t0 = time.time()
            losses = []
            for _ in range(steps):
                idx = self.rng.choice(len(self.train_samples), size=min(cfg.batch_size, len(self.train_samples)),
                                      replace=False)
                out = self.train_step([self.train_samples[i] for i in idx])
                if out is not None:
                    losses.append(out["loss"])
                    self.history.append({"iteration": self.iteration, "epoch": epoch, **out})
            val = self.validate() if self.val_samples else {"metric": float(np.mean(losses)), "mean_iou": math.nan}
            metric = val["metric"]
            self.scheduler.step(metric)
            improved = metric < self.best_metric
            if improved:
                self.best_metric, since_best = metric, 0
            else:
                since_best += 1
            ais = [h["ais_loss"] for h in self.history if h["epoch"] == epoch and "ais_loss" in h]
            ais_text = f", train AIS loss {np.mean(ais):.4f}" if ais else ""
            self.log(f"epoch {epoch}: train loss {np.mean(losses):.4f}{ais_text}, val metric {metric:.4f}, "
                     f"val mean IoU {val['mean_iou']:.4f}, lr {self.optimizer.param_groups[0]['lr']:.2e}, "
                     f"{time.time() - t0:.1f}s")
            if checkpoint_dir is not None:
                extra = {"epoch": epoch, "iteration": self.iteration, "best_metric": self.best_metric,
                         "current_metric": metric, "model_type": cfg.model_type, "image_size": cfg.image_size}
                state = self.sam.state_dict()
                decoder = self.ais_decoder.state_dict() if self.ais_decoder is not None else self.carried_decoder_state
                save_training_checkpoint(Path(checkpoint_dir) / "latest.pt", sam_state=state, decoder_state=decoder, **extra)
                if improved:
                    save_training_checkpoint(Path(checkpoint_dir) / "best.pt", sam_state=state, decoder_state=decoder, **extra)
            if cfg.early_stopping is not None and since_best >= cfg.early_stopping:
                self.log(f"early stopping: no improvement for {since_best} epochs")
                break
        return self.history


def train(train_data: Sequence[Tuple[np.ndarray, np.ndarray]], val_data: Sequence[Tuple[np.ndarray, np.ndarray]] = (),
          *, config: TrainConfig = TrainConfig(), checkpoint_dir: Optional[Path] = None,
          initial_weights: Optional[Union[str, Path]] = None, sam: Optional[Sam] = None,
          log: Optional[Callable[[str], None]] = print) -> Trainer:
    """Finetune ``sam`` (default: ``build_sam(config.model_type)`` with ``initial_weights`` loaded) and return
    the :class:`Trainer` (``.sam``, ``.history``, ``.best_metric``); checkpoints go to ``checkpoint_dir``.

    An AIS decoder in ``initial_weights`` (µSAM's ``decoder_state``) is trained on from its weights, or, when
    neither it (``train_ais_decoder=False``) nor the encoder is trained, written unchanged into the checkpoints."""
    decoder_state = None
    if sam is None:
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global torch RNG untouched
            torch.manual_seed(config.seed)
            sam = build_sam(config.model_type, image_size=config.image_size)
        if initial_weights is not None:
            # the one checkpoint loader (as usam export): files, URLs, registry names, compact int8 files
            checkpoint = load_checkpoint(initial_weights, model_type=config.model_type)
            sam.load_state_dict(checkpoint.sam_state, strict=True)
            decoder_state = checkpoint.decoder_state
    ais_decoder = None
    if decoder_state is not None and config.train_ais_decoder:
        from usam_bioimageio.modeling.unetr import load_ais_decoder, uses_conv_transpose

        if uses_conv_transpose(decoder_state) != config.ais_conv_transpose:
            config = dataclasses.replace(config, ais_conv_transpose=uses_conv_transpose(decoder_state))
        ais_decoder, decoder_state = load_ais_decoder(config.model_type, decoder_state), None
    trainer = Trainer(sam, train_data, val_data, config, log=log, ais_decoder=ais_decoder,
                      carried_decoder_state=decoder_state)
    trainer.fit(checkpoint_dir)
    return trainer


def read_pairs(images: Path, labels: Path) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(image, label image) pairs of two folders, matched by file stem (``usam train --train-images``)."""
    from usam_bioimageio.io.images import read_image

    pairs = []
    for image_path in sorted(p for p in Path(images).iterdir() if p.is_file()):
        matches = sorted(Path(labels).glob(image_path.stem + ".*"))
        if not matches:
            raise FileNotFoundError(f"no label image for {image_path} in {labels}")
        pairs.append((read_image(image_path), np.asarray(read_image(matches[0])).astype(np.int64)))
    return pairs
