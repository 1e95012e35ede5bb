"""Pure-torch Segment Anything (vit_b / vit_l / vit_h) and MobileSAM (vit_t) models.

No torchvision or timm; state_dict keys, shapes and numerics equal segment_anything's and mobile_sam's.
"""

from usam_bioimageio.modeling.build import build_sam, model_type_from_state_dict, seeded_sam
from usam_bioimageio.modeling.sam import Sam

__all__ = ["Sam", "build_sam", "model_type_from_state_dict", "seeded_sam"]
