"""Probe (issue 13): AIS at a larger pixel scale. Each of the first N `val` images is enlarged S times, run in the
model's native-size tiles (`usam ais --tile-shape auto`), the maps are resized back; prints the foreground IoU and
the mSA at µSAM's default thresholds per scale.

Usage (repository root): .venv/bin/python model_packages/dsb2018_vit_t_256/probes/scale.py FAMILY N S [S ...]
"""
import sys, time, numpy as np, torch
from scipy import ndimage
from usam_bioimageio.io.datasets import read_split
from usam_bioimageio.automatic.ais.decoder import ais_maps
from usam_bioimageio.automatic.ais.postprocess import instances_from_maps
from usam_bioimageio.evaluation.metrics import segmentation_scores
from usam_bioimageio.embeddings.compute import compute_embeddings, compute_tiled_embeddings
from usam_bioimageio.embeddings.types import AUTO_TILING, resolve_tiling
from usam_bioimageio.runtime.model import SamModel
model = SamModel.load(sys.argv[1]); n = int(sys.argv[2]); scales = [float(s) for s in sys.argv[3:]]
val = read_split("../shared/data/dsb2018", "val", n)
def maps_at(image, s):
    img = image if s == 1 else ndimage.zoom(image.astype(np.float32), (s, s) + (1,) * (image.ndim - 2), order=1)
    ts, halo = resolve_tiling(AUTO_TILING, None, img.shape, model.image_size)
    emb = compute_embeddings(model, img) if ts is None else compute_tiled_embeddings(model, img, tile_shape=ts, halo=halo, progress=False)
    m = ais_maps(model, img, embeddings=emb)
    if s != 1:
        m = np.stack([ndimage.zoom(c, (image.shape[0] / c.shape[0], image.shape[1] / c.shape[1]), order=1) for c in m])
    return m
for s in scales:
    t = time.time(); res = []
    for img, gt in val:
        m = maps_at(img, s)
        fg = m[0] > 0.5; g = gt > 0
        res.append(((fg & g).sum() / max(1, (fg | g).sum()), segmentation_scores(instances_from_maps(m), gt)["msa"]))
    r = np.array(res)
    print("scale", s, "fgIoU %.3f mSA(default) %.3f" % tuple(r.mean(0)), " per image mSA", " ".join("%.2f" % v for v in r[:, 1]), "%.0f s" % (time.time() - t), flush=True)
