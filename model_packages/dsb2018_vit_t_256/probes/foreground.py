"""Probe (issue 13): where AIS loses against Otsu. For a training checkpoint, on the first 16 `val` images in the
runtime frame: foreground IoU of the AIS decoder and of Otsu, and the mSA of connected components of the predicted
foreground, of µSAM's post-processing, of the predicted distances with the ground-truth foreground, and of Otsu +
watershed.

Usage (repository root): .venv/bin/python model_packages/dsb2018_vit_t_256/probes/foreground.py CHECKPOINT
"""
import sys, numpy as np, torch
torch.set_num_threads(1)
from scipy import ndimage
from usam_bioimageio.io.datasets import read_split
from usam_bioimageio.training.recipe import RecipeConfig, RecipeTrainer
from usam_bioimageio.automatic.ais.postprocess import instances_from_maps
from usam_bioimageio.evaluation.metrics import segmentation_scores
from usam_bioimageio.modeling.unetr import maps_to_original
from usam_bioimageio.evaluation.baseline import otsu_watershed
from skimage.filters import threshold_otsu
data = "../shared/data/dsb2018"
val = read_split(data, "val", 16)
cfg = RecipeConfig(stage="ais", model_type="vit_t", image_size=256, frame_prob=0.5, val_msa=True, encoder_batchnorm="frozen")
t = RecipeTrainer(val[:1], val, cfg, initial_weights=sys.argv[1])
rows = []
with torch.no_grad():
    for (img, gt), crop in zip(val, t.val_crops):
        maps = t.ais_decoder(t._encode(crop.x, False))
        maps = maps_to_original(maps.cpu(), torch.zeros(gt.shape))[0].numpy()
        fg = maps[0] > 0.5
        g = gt > 0
        iou = (fg & g).sum() / max(1, (fg | g).sum())
        cc = ndimage.label(fg)[0]
        ms_cc = segmentation_scores(cc, gt)["msa"]
        ms = segmentation_scores(instances_from_maps(maps), gt)["msa"]
        # GT foreground + predicted distances
        m2 = maps.copy(); m2[0] = g.astype(np.float32)
        ms_gtfg = segmentation_scores(instances_from_maps(m2), gt)["msa"]
        gray = img if img.ndim == 2 else img[..., :3].mean(-1)
        ot = gray > threshold_otsu(gray)
        ot_iou = max((ot & g).sum() / max(1, (ot | g).sum()), (~ot & g).sum() / max(1, (~ot | g).sum()))
        ms_ot = segmentation_scores(otsu_watershed(img), gt)["msa"]
        rows.append((iou, ot_iou, ms_cc, ms, ms_gtfg, ms_ot, gt.shape, gt.max()))
        print("fgIoU %.3f otsuIoU %.3f | mSA cc %.3f usam %.3f gtfg+dist %.3f otsu_ws %.3f | %s n=%d" % rows[-1], flush=True)
a = np.array([r[:6] for r in rows])
print("mean", " ".join("%.3f" % v for v in a.mean(0)))
