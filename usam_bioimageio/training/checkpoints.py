"""Loading SAM / µSAM checkpoints safely, and saving them in µSAM's layout.

Layouts understood (micro_sam 1.8.14, micro_sam/util.py ``_load_checkpoint``, ``export_custom_sam_model``,
``training.export_instance_segmentation_model`` and ``bioimageio.model_export``):

* a plain SAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), as published by
  segment-anything, MobileSAM and the µSAM registry;
* ``{"model_state": <SAM state dict>, "decoder_state": <UNETR decoder state dict>, ...}``: µSAM finetuning
  checkpoints (torch_em trainer; the keys of ``model_state`` carry the ``sam.`` prefix of µSAM's TrainableSAM
  wrapper, stripped here key by key like µSAM does) and µSAM's exported "model with decoder" files;
  ``decoder_state`` is optional;
* a *compact* file (:func:`save_compact_checkpoint`, our format for shipping small models): µSAM's layout
  with the large weight tensors as int8 per output channel plus a float32 scale; loaded dequantized;
* a published model name (``usam_bioimageio.registry.PUBLISHED_MODELS``): the model file is fetched and its hash
  checked; the AIS decoder, a separate file holding the plain decoder state dict, is fetched too.

Every file is read with ``torch.load(..., map_location="cpu", weights_only=True)``: pickles that reference
arbitrary Python objects are refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from usam_bioimageio.io import download
from usam_bioimageio.registry import ARCHITECTURES, IMAGE_SIZE, PATCH_SIZE, PUBLISHED_MODELS, PublishedModel, check_image_size

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint", "save_compact_checkpoint", "save_training_checkpoint",
           "SAM_PREFIX", "IMAGE_SIZE_KEY", "PIXEL_SCALE_KEY"]

SAM_PREFIX = "sam."  # µSAM TrainableSAM wrapper (micro_sam.training.trainable_sam)
_SAM_COMPONENTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
# Top-level key of the model's input size (registry.IMAGE_SIZES), written only when it is not SAM's 1024: a
# 1024 file stays exactly µSAM's layout, and every file without the key (SAM, MobileSAM, µSAM) is 1024.
IMAGE_SIZE_KEY = "image_size"
# Top-level key of the pixel scale the model was trained at (`usam train --scale S`: crops of images enlarged S
# times), written only when it is not 1, like IMAGE_SIZE_KEY; the exporter records it as config.usam.pixel_scale
# and `usam ais` runs the model at it by default.
PIXEL_SCALE_KEY = "pixel_scale"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint: the SAM weights, the optional AIS (UNETR) decoder weights and where they came from."""

    model_type: str
    sam_state: Dict[str, Tensor]
    decoder_state: Optional[Dict[str, Tensor]]
    source: str
    image_size: int = IMAGE_SIZE  # the encoder's input side (registry.IMAGE_SIZES)
    pixel_scale: float = 1.0  # the scale the model was trained at: it segments images enlarged this many times

    @property
    def has_decoder(self) -> bool:
        return self.decoder_state is not None


# --------------------------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # legacy (non-zip) torch.save files start with a pickled magic number
_REFUSAL_DETAIL_WORDS = ("GLOBAL", "Unsupported", "Unpickler error")  # torch's line naming what it refused


def _torch_load(path: Path):
    """``torch.load`` with weights_only=True, every failure turned into a clear error naming ``path``."""
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"Checkpoint {path} is not a file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"Checkpoint {path} is empty")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        hint = " (it looks like a text / HTML page, e.g. an error page saved by a download)" if head.lstrip()[:1] in (
            b"<", b"{", b"#") else ""
        raise ValueError(f"{path} is not a torch checkpoint: unknown file header {head!r}{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only load failed" in msg.lower():
            detail = next(
                (ln.strip() for ln in msg.splitlines() if any(w in ln for w in _REFUSAL_DETAIL_WORDS)),
                "",
            )
            detail = f"(torch: {detail.rstrip('.')})" if detail else ""
            raise ValueError(
                f"Checkpoint {path} was refused as untrusted: torch.load(weights_only=True) will not unpickle the "
                f"Python objects it references, since loading them could run arbitrary code {detail}. "
                "Only plain tensor state dicts are accepted; if you trust the file, re-save its state dicts "
                "(e.g. micro_sam.util.export_custom_sam_model) and load that."
            ) from None
        raise ValueError(f"{path} is not a readable torch checkpoint (corrupt pickle): {msg}") from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, AttributeError, IndexError, TypeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        kind = "truncated or corrupt" if isinstance(e, (EOFError, RuntimeError)) else "corrupt or not a torch file"
        raise ValueError(f"{path} is not a readable torch checkpoint ({kind}): {type(e).__name__}: {first}") from None


def _load_fetched(path: Path, url: str):
    """``_torch_load`` of ``path``, fetched from ``url``: a download that fails to parse (an HTML error page saved
    as the checkpoint) is removed from the cache, so that the next run downloads it again instead of reusing it."""
    try:
        return _torch_load(path)
    except ValueError as err:
        try:
            cached = path.resolve().is_relative_to(download.cache_dir().resolve())
        except OSError:
            cached = False
        if not cached:  # a local file (a path or file:// URL) is the user's: never removed
            raise
        path.unlink(missing_ok=True)
        raise ValueError(f"{err}; removed the download of {url} from the cache ({path}): the next run downloads "
                         "it again") from None


def _tensor_dict(state, what: str, where: str) -> Dict[str, Tensor]:
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: {what} is a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{where}: {what} is not a state dict of tensors (entries {bad[:5]!r} are not)")
    if not state:
        raise ValueError(f"{where}: {what} is empty")
    return dict(state)


def _strip_prefix(state: Mapping, prefix: str, where: str) -> Dict:
    out: Dict = {}
    for k, v in state.items():
        key = k[len(prefix):] if isinstance(k, str) and k.startswith(prefix) else k
        if key in out:
            raise ValueError(f"{where}: key {key!r} occurs both with and without the {prefix!r} prefix")
        out[key] = v
    return out


def _split(obj, where: str):
    """(sam_state, decoder_state, recorded image size or None, pixel scale) from a loaded object in any supported
    layout (the pixel scale is 1 unless recorded)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} does not hold a SAM state dict: it holds a {type(obj).__name__}")
    if COMPACT_KEY in obj:
        obj = {k: _dequantize(v, where) for k, v in obj.items() if k != COMPACT_KEY}
    recorded, pixel_scale = None, 1.0
    if "model_state" in obj:
        model_state, decoder_state = obj["model_state"], obj.get("decoder_state")
        if IMAGE_SIZE_KEY in obj:
            try:
                recorded = check_image_size(obj[IMAGE_SIZE_KEY])
            except ValueError as e:
                raise ValueError(f"{where}: {IMAGE_SIZE_KEY!r}: {e}") from None
        if PIXEL_SCALE_KEY in obj:
            pixel_scale = _pixel_scale(obj[PIXEL_SCALE_KEY], where)
    else:
        model_state, decoder_state = obj, None
    if not isinstance(model_state, Mapping):
        raise ValueError(f"{where}: 'model_state' is a {type(model_state).__name__}, not a state dict")
    sam_state = _tensor_dict(_strip_prefix(model_state, SAM_PREFIX, where), "the SAM state", where)
    missing = [c.rstrip(".") for c in _SAM_COMPONENTS if not any(k.startswith(c) for k in sam_state)]
    if missing:
        raise ValueError(
            f"{where} is not a SAM state dict: no {', '.join(missing)} weights "
            f"(first keys: {list(sam_state)[:5]})"
        )
    if decoder_state is not None:
        decoder_state = _tensor_dict(decoder_state, "'decoder_state'", where)
    return sam_state, decoder_state, recorded, pixel_scale


def _pixel_scale(value, where: str) -> float:
    from usam_bioimageio.runtime.pixel_scale import check_scale

    try:
        return check_scale(value.item() if isinstance(value, Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: {PIXEL_SCALE_KEY!r}: {e}") from None


def _image_size(sam_state: Dict[str, Tensor], recorded: Optional[int], where: str) -> int:
    """The input size of the weights: a ViT's position embedding (1, S/16, S/16, C) tells it and must agree
    with the recorded one; TinyViT's weights do not depend on it, so its size is the recorded one (or 1024)."""
    pos = sam_state.get("image_encoder.pos_embed")
    if pos is None or pos.dim() != 4:
        return IMAGE_SIZE if recorded is None else recorded
    try:
        size = check_image_size(int(pos.shape[1]) * PATCH_SIZE)
    except ValueError as e:
        raise ValueError(f"{where}: position embedding of shape {tuple(pos.shape)}: {e}") from None
    if recorded is not None and recorded != size:
        raise ValueError(f"{where}: records image size {recorded}, but its position embedding is for {size}")
    return size


def _detect_model_type(sam_state: Dict[str, Tensor], where: str) -> str:
    # Imported lazily: usam_bioimageio.modeling.build is written in parallel with this module.
    from usam_bioimageio.modeling import model_type_from_state_dict

    try:
        return model_type_from_state_dict(sam_state)
    except ValueError as e:
        raise ValueError(f"{where}: cannot tell the SAM model type: {e}") from None


def _expected_type(model_type: Optional[str]) -> Optional[str]:
    if model_type is None:
        return None
    if model_type in ARCHITECTURES:
        return model_type
    if model_type in PUBLISHED_MODELS:  # a µSAM name such as "vit_b_lm": its architecture
        return PUBLISHED_MODELS[model_type].model_type
    raise ValueError(f"Unknown model type {model_type!r}; known: {sorted(ARCHITECTURES)}")


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def _fetch_published(entry: PublishedModel, progress: bool):
    # Cache names carry a hash prefix, so that a registry update never reuses a file of an older version.
    tag = (entry.sha256 or entry.xxh128 or "unhashed")[:8]
    model_path = download.fetch(
        entry.url, sha256=entry.sha256, xxh128=entry.xxh128, progress=progress, filename=f"{entry.name}-{tag}.pt"
    )
    decoder_path = None
    if entry.decoder_url is not None:
        dtag = (entry.decoder_sha256 or entry.decoder_xxh128 or "unhashed")[:8]
        decoder_path = download.fetch(
            entry.decoder_url, sha256=entry.decoder_sha256, xxh128=entry.decoder_xxh128, progress=progress,
            filename=f"{entry.name}_decoder-{dtag}.pt",
        )
    return model_path, decoder_path


def load_checkpoint(
    source: Union[str, os.PathLike],
    *,
    model_type: Optional[str] = None,
    sha256: Optional[str] = None,
    progress: bool = True,
) -> Checkpoint:
    """Load a SAM / µSAM checkpoint from a file path, an http(s) / file URL or a published model name.

    Args:
        source: a path, a URL (fetched into the download cache) or a name from
            ``usam_bioimageio.registry.PUBLISHED_MODELS`` (fetched and hash-checked, with its decoder).
        model_type: the expected architecture (vit_t / vit_b / vit_l / vit_h, or a published name standing for
            its architecture); a ValueError is raised if the weights are of another one.
        sha256: expected sha256 of the file for a path or URL source.
        progress: progress bar while downloading.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not a torch file, truncated or corrupt, refused by ``weights_only=True`` as untrusted, not a
            SAM state dict, or of another model type than ``model_type``.
        download.DownloadError / download.ChecksumError: fetching failed or the hash is wrong.
    """
    expected = _expected_type(model_type)
    decoder_path = None
    entry = None
    if isinstance(source, str) and source in PUBLISHED_MODELS and not Path(source).exists():
        entry = PUBLISHED_MODELS[source]
        path, decoder_path = _fetch_published(entry, progress)
        label = source
    elif isinstance(source, str) and _is_url(source):
        path = download.fetch(source, sha256=sha256, progress=progress)
        label = source
    else:
        path = Path(source).expanduser()
        if not path.exists():
            names = ""
            if os.sep not in str(source) and not path.suffix:  # looks like a model name
                names = f" (nor a published model name: {sorted(PUBLISHED_MODELS)})"
            raise FileNotFoundError(f"Checkpoint not found: {path}{names}")
        if sha256 is not None:
            download.fetch(str(path), sha256=sha256, progress=False)
        label = str(path)

    where = f"checkpoint {label}" if label == str(path) else f"checkpoint {label} ({path})"
    fetched = entry is not None or label != str(path)
    sam_state, decoder_state, recorded, pixel_scale = _split(_load_fetched(path, entry.url if entry else label) if fetched
                                      else _torch_load(path), where)
    if decoder_path is not None:
        if decoder_state is not None:
            raise ValueError(f"{where} holds a decoder_state although the registry lists a separate decoder file")
        dwhere = f"decoder of {label} ({decoder_path})"
        decoder_state = _tensor_dict(_load_fetched(decoder_path, entry.decoder_url), "the decoder file", dwhere)

    detected = _detect_model_type(sam_state, where)
    if entry is not None and detected != entry.model_type:
        raise ValueError(f"{where}: the weights are {detected}, but the registry lists {entry.model_type}")
    if expected is not None and detected != expected:
        raise ValueError(f"{where}: the weights are {detected}, not the requested model type {model_type!r}")
    return Checkpoint(model_type=detected, sam_state=sam_state, decoder_state=decoder_state, source=label,
                      image_size=_image_size(sam_state, recorded, where), pixel_scale=pixel_scale)


def as_micro_sam_infers(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint as micro-sam (and MobileSAM's ``build_sam_vit_t``) run it at inference: for vit_t, every
    TinyViT ``attention_biases`` table set to zero; other model types unchanged.

    Why: MobileSAM's attention caches its bias table (``ab``) when ``eval()`` is called, and both builders call
    ``eval()`` on the freshly initialised model (biases zero) before they load the weights; nothing refreshes
    the cache afterwards, so their vit_t inference ignores the loaded biases. Our packages use the loaded
    biases by default (the weights as trained: training mode reads the live table); this gives the numbers
    micro-sam gives instead.
    """
    if ckpt.model_type != "vit_t":
        return ckpt
    state = {k: (torch.zeros_like(v) if k.endswith(".attention_biases") else v) for k, v in ckpt.sam_state.items()}
    return Checkpoint(model_type=ckpt.model_type, sam_state=state, decoder_state=ckpt.decoder_state,
                      source=f"{ckpt.source} (attention biases as micro-sam infers: zero)", image_size=ckpt.image_size,
                      pixel_scale=ckpt.pixel_scale)


# --------------------------------------------------------------------------------------------------------------
# compact files: int8 weights per output channel
# --------------------------------------------------------------------------------------------------------------

COMPACT_KEY = "usam_compact_int8"  # top-level marker of a compact file: {"version": tensor(1)}
_Q, _SCALE = ".__int8", ".__scale"
COMPACT_MIN_ELEMENTS = 4096  # smaller tensors (biases, norms, attention bias tables) stay float32


def _quantize(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Float tensors of >= COMPACT_MIN_ELEMENTS elements and >= 2 dims -> int8 ``round(w / s)`` with one
    scale ``s = max|w| / 127`` per output channel (dim 0); the rest as float32 (or as they are)."""
    out: Dict[str, Tensor] = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dim() >= 2 and v.numel() >= COMPACT_MIN_ELEMENTS:
            w = v.detach().to(torch.float32)
            scale = w.abs().flatten(1).amax(1).clamp(min=1e-12) / 127.0
            shape = (-1,) + (1,) * (w.dim() - 1)
            out[k + _Q] = torch.round(w / scale.view(shape)).clamp(-127, 127).to(torch.int8)
            out[k + _SCALE] = scale
        else:
            out[k] = v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
    return out


def _dequantize(state, where: str):
    if not isinstance(state, Mapping):
        return state
    out = {}
    for k, v in state.items():
        if isinstance(k, str) and k.endswith(_SCALE):
            continue
        if isinstance(k, str) and k.endswith(_Q):
            name = k[: -len(_Q)]
            scale = state.get(name + _SCALE)
            if not isinstance(v, Tensor) or v.dtype != torch.int8 or not isinstance(scale, Tensor) \
                    or scale.shape != (v.shape[0],):
                raise ValueError(f"{where}: compact tensor {name!r} has no matching int8 values and scales")
            out[name] = v.to(torch.float32) * scale.view((-1,) + (1,) * (v.dim() - 1))
        else:
            out[k] = v
    return out


def save_compact_checkpoint(
    path: Union[str, os.PathLike],
    *,
    sam_state: Mapping[str, Tensor],
    decoder_state: Optional[Mapping[str, Tensor]] = None,
    image_size: int = IMAGE_SIZE,
    pixel_scale: float = 1.0,
) -> Path:
    """Write a compact file: µSAM's layout with weights as int8 per output channel (about a quarter of float32;
    the relative error per weight is at most 1/254 of its channel's largest magnitude). :func:`load_checkpoint`
    reads it dequantized, so everything exported from it uses exactly those dequantized weights."""
    where = f"save_compact_checkpoint({path})"
    state = {"model_state": _quantize(_tensor_dict(sam_state, "sam_state", where)),
             COMPACT_KEY: {"version": torch.tensor(1)}, **_facts(image_size, pixel_scale, where)}
    if decoder_state is not None:
        state["decoder_state"] = _quantize(_tensor_dict(decoder_state, "decoder_state", where))
    return _save_atomic(Path(path), state)


def save_checkpoint(
    path: Union[str, os.PathLike],
    *,
    sam_state: Mapping[str, Tensor],
    decoder_state: Optional[Mapping[str, Tensor]] = None,
    image_size: int = IMAGE_SIZE,
    pixel_scale: float = 1.0,
) -> Path:
    """Write ``{"model_state": sam_state[, "decoder_state": decoder_state]}`` (µSAM's layout) atomically.

    ``decoder_state`` is left out when None: µSAM takes the mere presence of the key to mean "has a decoder".
    The file is written to a temporary file next to ``path`` and moved into place with ``os.replace``.
    """
    path = Path(path)
    where = f"save_checkpoint({path})"
    state = {"model_state": _tensor_dict(sam_state, "sam_state", where), **_facts(image_size, pixel_scale, where)}
    if decoder_state is not None:
        state["decoder_state"] = _tensor_dict(decoder_state, "decoder_state", where)
    return _save_atomic(path, state)


def save_training_checkpoint(
    path: Union[str, os.PathLike],
    *,
    sam_state: Mapping[str, Tensor],
    decoder_state: Optional[Mapping[str, Tensor]] = None,
    image_size: int = IMAGE_SIZE,
    pixel_scale: float = 1.0,
    **extra,
) -> Path:
    """Write a finetuning checkpoint as µSAM's trainer does: ``{"model_state": {"sam." + key: tensor}[,
    "decoder_state": ...], **extra}`` (``extra``: training bookkeeping, plain values), atomically."""
    path = Path(path)
    where = f"save_training_checkpoint({path})"
    sam = _tensor_dict(sam_state, "sam_state", where)
    state = {"model_state": {SAM_PREFIX + k: v for k, v in sam.items()}, **extra, **_facts(image_size, pixel_scale, where)}
    if decoder_state is not None:
        state["decoder_state"] = _tensor_dict(decoder_state, "decoder_state", where)
    return _save_atomic(path, state)


def _facts(image_size: int, pixel_scale: float, where: str) -> dict:
    """``{IMAGE_SIZE_KEY: size}`` for a size other than 1024 and ``{PIXEL_SCALE_KEY: scale}`` for a scale other
    than 1, else nothing (see IMAGE_SIZE_KEY and PIXEL_SCALE_KEY)."""
    size, scale = check_image_size(image_size), _pixel_scale(pixel_scale, where)
    return {**({} if size == IMAGE_SIZE else {IMAGE_SIZE_KEY: size}),
            **({} if scale == 1.0 else {PIXEL_SCALE_KEY: scale})}


def _save_atomic(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
