"""Probe (issue 13): box prompts where the runtime can run them. For the first N `val` images, one box per
ground-truth object (its bounding box), scored at the start (`box_msa`'s setting): in the frame (the whole image
resized to the model's input, `usam segment` at scale 1 untiled), and at each scale S on the model's native-size
tiles of the image enlarged S times (`usam segment --tile-shape auto --scale S`); the filled box (each box as its
mask) for reference. Prints mSA and the mean IoU of each object's mask with its object.

Usage (repository root): .venv/bin/python model_packages/dsb2018_vit_t_256/probes/prompts.py FAMILY N S [S ...]
"""
import sys, time, numpy as np
from usam_bioimageio.io.datasets import read_split
from usam_bioimageio.embeddings.compute import compute_embeddings, compute_image_embeddings
from usam_bioimageio.embeddings.types import AUTO_TILING
from usam_bioimageio.evaluation.interactive import interactive_segmentation
from usam_bioimageio.evaluation.metrics import segmentation_scores
from usam_bioimageio.evaluation.report import filled_box_labels
from usam_bioimageio.prompting import iterative as ip
from usam_bioimageio.prompting.scaled import segment_from_prompts_scaled
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.pixel_scale import scale_image
model = SamModel.load(sys.argv[1]); n = int(sys.argv[2]); scales = [float(s) for s in sys.argv[3:]]
val = read_split("../shared/data/dsb2018", "val", n)
print("filled box mSA %.3f" % np.mean([segmentation_scores(filled_box_labels(g), g)["msa"] for _, g in val]))
for s in [None] + scales:
    t = time.time(); res = []
    for img, gt in val:
        emb = compute_embeddings(model, img) if s is None else \
            compute_image_embeddings(model, scale_image(img, s), tile_shape=AUTO_TILING, progress=False)
        scale = 1.0 if s is None else s
        (r,) = interactive_segmentation(model, img, gt, start="box", n_iterations=1, embeddings=emb, scale=scale)
        ids = np.unique(gt)[1:]
        masks = ip.object_masks(gt, ids)
        pred = segment_from_prompts_scaled(model, emb, shape=gt.shape, scale=scale,
                                           boxes=ip.bounding_boxes(masks).astype(float)).masks[:, 0]
        iou = np.mean([(p & m).sum() / max(1, (p | m).sum()) for p, m in zip(pred, masks)])
        res.append((r.msa, iou))
    a = np.array(res)
    print("frame" if s is None else f"tiles at scale {s:g}", "box mSA %.3f mean IoU %.3f" % tuple(a.mean(0)),
          "%.0f s" % (time.time() - t), flush=True)
