import numpy as np
from PIL import Image


def to_pil_image(pic, mode=None):
    if not isinstance(pic, np.ndarray):
        raise TypeError("the stand-in only handles numpy arrays")
    return Image.fromarray(pic, mode=mode)


def resize(img, size, interpolation=None, max_size=None, antialias=True):
    if not isinstance(img, Image.Image):
        raise TypeError("the stand-in only handles PIL images (torchvision's PIL path)")
    h, w = size
    return img.resize((int(w), int(h)), Image.BILINEAR)
