"""Probe (issue 13): AIS at a larger pixel scale. Each of the first N `val` images is enlarged S times and run in
the model's native-size tiles (`usam ais --tile-shape auto --scale S`), the maps resized back; prints the
foreground IoU and the mSA at µSAM's default thresholds per scale.

Usage (repository root): .venv/bin/python model_packages/dsb2018_vit_t_256/probes/scale.py FAMILY N S [S ...]
"""
import sys, time, numpy as np
from usam_bioimageio.io.datasets import read_split
from usam_bioimageio.automatic.ais.decoder import ais_maps
from usam_bioimageio.automatic.ais.postprocess import instances_from_maps
from usam_bioimageio.evaluation.metrics import segmentation_scores
from usam_bioimageio.embeddings.compute import compute_image_embeddings
from usam_bioimageio.embeddings.types import AUTO_TILING
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.pixel_scale import scale_image
model = SamModel.load(sys.argv[1]); n = int(sys.argv[2]); scales = [float(s) for s in sys.argv[3:]]
val = read_split("../shared/data/dsb2018", "val", n)
for s in scales:
    t = time.time(); res = []
    for img, gt in val:
        emb = compute_image_embeddings(model, scale_image(img, s), tile_shape=AUTO_TILING, progress=False)
        m = ais_maps(model, img, embeddings=emb, scale=s)
        fg = m[0] > 0.5; g = gt > 0
        res.append(((fg & g).sum() / max(1, (fg | g).sum()), segmentation_scores(instances_from_maps(m), gt)["msa"]))
    r = np.array(res)
    print("scale", s, "fgIoU %.3f mSA(default) %.3f" % tuple(r.mean(0)), " per image mSA", " ".join("%.2f" % v for v in r[:, 1]), "%.0f s" % (time.time() - t), flush=True)
