"""micro-sam's own embedding caches (2D, tiled, tiled with a mask, 3D, 3D tiled) for the cache reader's test:
tests/data/micro_sam_caches/*.zarr, written by micro-sam 1.8.14's ``precompute_image_embeddings`` with a stand-in
image encoder (only the layout matters), and ``expected.npz``: the features micro-sam's per-tile path gives.

usage (the reference venv, scripts/micro_sam_venv.sh): /tmp/usam-ais-ref/bin/python scripts/micro_sam_cache_fixture.py
"""
import shutil
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "tests" / "data" / "micro_sam_caches"
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
sys.path.insert(0, str(root / "scripts"))
from micro_sam_env import setup_imports  # torchvision stand-ins (tests/_shims) when it cannot import
setup_imports()
import numpy as np
import torch
from micro_sam import util
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from usam_bioimageio.embeddings.types import Tiling


class StandIn(torch.nn.Module):
    """A cheap image encoder whose features compress (the fixture is committed): 256 x 256 average pooling of
    SAM's input, repeated to 64 x 64 and scaled per channel; each tile's features still differ."""
    img_size = 1024

    def forward(self, x):
        p = torch.nn.functional.avg_pool2d(x, 256).repeat_interleave(16, -2).repeat_interleave(16, -1)
        return p.repeat(1, 86, 1, 1)[:, :256] * (torch.arange(1, 257, dtype=x.dtype).view(1, 256, 1, 1) / 256)


predictor = SamPredictor(Sam(image_encoder=StandIn(), prompt_encoder=torch.nn.Identity(),
                             mask_decoder=torch.nn.Identity()))
predictor.model_type, predictor.model_name, predictor._hash = "vit_t", "vit_t", "stand-in"


def embed(image):  # micro-sam's own per-tile path: _to_image, then SAM's transform and the encoder
    return util._compute_embeddings_batched(predictor, [util._to_image(image)])[0][0:1].numpy()


rng = np.random.default_rng(0)
image = rng.integers(0, 4000, (300, 500)).astype(np.uint16)
volume = rng.integers(0, 255, (3, 90, 70)).astype(np.uint8)
mask = np.zeros(image.shape, bool)
mask[:100, :150] = True
cases = {"2d": (image, None, None, None), "2d_tiled": (image, (128, 200), (16, 32), None),
         "2d_tiled_mask": (image, (128, 200), (16, 32), mask), "3d": (volume, None, None, None),
         "3d_tiled": (volume, (64, 64), (8, 8), None)}
expected = {}
with torch.no_grad():
    for name, (data, tile_shape, halo, m) in cases.items():
        # micro-sam 1.8.14 splits the tiles in a mask into ceil(n_tiles / batch_size) batches: with batch_size 1
        # and a tile outside the mask a batch is empty and torch.cat fails, so one batch for the masked case
        util.precompute_image_embeddings(predictor, data, save_path=str(out / f"{name}.zarr"), tile_shape=tile_shape,
                                         halo=halo, verbose=False, mask=m, batch_size=1 if m is None else 64)
        for z, plane in enumerate([data] if name.startswith("2d") else list(data)):
            if tile_shape is None:
                expected[f"{name}/{z}/0"] = embed(plane)
            else:
                tiling = Tiling.create(plane.shape, tile_shape, halo)
                for t in range(len(tiling)):
                    expected[f"{name}/{z}/{t}"] = embed(plane[tiling.tile(t).outer_slices])
np.savez_compressed(out / "expected.npz", **expected)
