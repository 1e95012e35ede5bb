"""Bad input at the command line: images, prompts, packages, embeddings / caches, outputs and URLs (loopback servers
only). Each case asserts the exit status, a message naming the problem (one line, no traceback), that no file was
left behind (no ``.part`` file, no partial output) and that every file there before is untouched. Plus
property-based fuzzing (hypothesis) of the prompt-file and image readers: nothing but our errors escapes them.

Almost every case fails before a model is loaded (``--model`` names a folder that does not exist, so a check that
came too late would show up as the wrong message); the few that need a model use the session's ``vit_t_family``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import tempfile
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from loopback import answer

from usam_bioimageio.cli.main import main
from usam_bioimageio.errors import UsamError

H = W = 64
GOOD_PROMPTS = {"objects": [{"box": [4, 4, 30, 30]}, {"points": [[40, 40], [10, 50]], "labels": [1, 0]}]}
GOOD_CSV = "object,kind,x,y,label,x1,y1\na,box,4,4,,30,30\nb,point,40,40,1,,\n"


# -- the workspace and the checks every case makes ---------------------------------------------------------------

class Workspace:
    """A folder with good inputs; a case spoils one of them. ``model`` is a folder that does not exist."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        self.image = rng.integers(0, 4000, size=(H, W), dtype=np.uint16)
        tifffile.imwrite(root / "img.tif", self.image)
        (root / "prompts.json").write_text(json.dumps(GOOD_PROMPTS))
        (root / "prompts.csv").write_text(GOOD_CSV)
        self.model = str(root / "no-model")

    def p(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, data) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        elif isinstance(data, np.ndarray):
            tifffile.imwrite(path, data)
        else:
            path.write_text(json.dumps(data), encoding="utf-8")
        return str(path)

    def segment(self, *extra, image="img.tif", prompts="prompts.json", out="labels.tif", model=None):
        return ["segment", "--model", model or self.model, "--image", self.p(image), "--prompts", self.p(prompts),
                "--out", self.p(out), "--quiet", *extra]

    def embed(self, *extra, image="img.tif"):
        return ["embed", "--model", self.model, "--image", self.p(image), "--quiet", *extra]

    def auto(self, command, *extra, image="img.tif", out="labels.tif"):
        return [command, "--model", self.model, "--image", self.p(image), "--out", self.p(out), "--quiet", *extra]


def snapshot(root: Path) -> dict:
    """{relative path: sha256, or 'dir'} of everything under ``root``; the folders the package loader makes in
    the download cache ($USAM_CACHE_DIR = root/cache) are not outputs, the files in it are checked."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            if not rel.startswith("cache"):
                out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_failing(root: Path, argv, rc: int, message: str, capsys):
    """Run ``usam argv``; assert exit ``rc``, one line on stderr naming ``message``, nothing written or changed."""
    before = snapshot(root)
    capsys.readouterr()
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == rc, f"exit {got}, expected {rc}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usam "), f"not one line: {err!r}"
    assert "Traceback" not in err and "internal error" not in err, err
    assert message.lower() in err.lower(), f"{message!r} not in {err!r}"
    after = snapshot(root)
    assert after == before, (f"files changed: added {sorted(set(after) - set(before))}, removed "
                             f"{sorted(set(before) - set(after))}, modified "
                             f"{sorted(k for k in before if k in after and before[k] != after[k])}")
    return err


# -- inputs made for the cases -----------------------------------------------------------------------------------

def png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds no pixel data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory) -> Path:
    """A ~300 KB TIFF declaring 16384 x 16384 pixels (zlib-compressed zero tiles), as in issue 15."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tif"
    tile = np.zeros((1024, 1024), np.uint8)
    tifffile.imwrite(path, data=(tile for _ in range(256)), shape=(16384, 16384), dtype=np.uint8,
                     tile=(1024, 1024), compression="zlib")
    return path


def stack8() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, size=(8, H, W), dtype=np.uint8)


def npz_for(ws: Workspace, image: np.ndarray, name: str = "e.npz", **overrides) -> str:
    from usam_bioimageio.embeddings.cache import data_sha256

    fields = dict(features=np.zeros((1, 256, 64, 64), np.float32), original_shape=np.asarray(image.shape[:2]),
                  encoder=np.asarray("x" * 64), data_sha256=np.asarray(data_sha256(image)))
    fields.update(overrides)
    fields = {k: v for k, v in fields.items() if v is not None}
    path = ws.root / name
    with open(path, "wb") as f:
        np.savez(f, **fields)
    return str(path)


class _Identity:
    """What make_signature needs of a model: the encoder identity and SAM's input size."""

    def __init__(self, identity: str, image_size: int = 1024):
        self.encoder_identity = identity
        self.image_size = image_size


def write_cache(path: Path, image: np.ndarray, identity: str = "x" * 64, stack: bool = False,
                value: float = 0.5) -> Path:
    """A complete cache of ours for ``image`` with zero features, written without a model."""
    from usam_bioimageio.embeddings.cache import EmbeddingCache, make_signature

    n = image.shape[0] if stack else 1
    shape = image.shape[1:3] if stack else image.shape[:2]
    store = EmbeddingCache.open(path, signature=make_signature(_Identity(identity), image, stack=stack, tiling=None),
                                n_slices=n, image_shape=shape, tiling=None)
    for z in range(n):  # not zeros: zarr does not store chunks equal to the fill value
        store.write(z, 0, np.full((1, 256, 64, 64), value, np.float32))
    return path


# -- the cases: name -> (argv, exit status, message) given a Workspace -----------------------------------------------

CASES = {}


def case(name, rc=1):
    def register(fn):
        CASES[name] = (fn, rc)
        return fn
    return register


def _image_case(name, make, message, suffix=".tif", command="segment"):
    def fn(ws):
        path = ws.write(f"bad{suffix}", make())
        if command == "segment":
            argv = ws.segment(image=Path(path).name)
        elif command == "ais-folder":  # the image alone in a folder
            os.makedirs(ws.root / "images", exist_ok=True)
            os.replace(path, ws.root / "images" / Path(path).name)
            argv = ws.auto("ais", image="images", out="out")
        else:
            argv = ws.auto(command, image=Path(path).name)
        return argv, message
    case(f"image-{name}")(fn)


def _tif_bytes(array) -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


# images
_image_case("empty-file", lambda: b"", "cannot read image")
_image_case("random-bytes-tif", lambda: os.urandom(500), "cannot read image")
_image_case("random-bytes-png", lambda: os.urandom(500), "cannot read image", ".png")
_image_case("random-bytes-jpg", lambda: os.urandom(500), "cannot read image", ".jpg")
_image_case("text-as-png", lambda: "not an image at all", "cannot read image", ".png")
_image_case("truncated-tif", lambda: _tif_bytes(np.ones((256, 256), np.uint16))[:3000], "cannot read image")
_image_case("truncated-png", lambda: png_bytes(np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8))[:900],
            "cannot read image", ".png")
_image_case("unknown-suffix", lambda: "hello", "cannot read image", ".txt")
_image_case("nan", lambda: np.where(np.eye(H, dtype=bool), np.nan, 1.0).astype(np.float32), "NaN or infinite")
_image_case("inf", lambda: np.where(np.eye(H, dtype=bool), np.inf, 1.0).astype(np.float32), "NaN or infinite")
_image_case("minus-inf-float64", lambda: np.where(np.eye(H, dtype=bool), -np.inf, 1.0), "NaN or infinite")
_image_case("float64-near-1e300", lambda: np.linspace(1e300, 2e300, H * W).reshape(H, W), "beyond float32")
_image_case("float64-near-1e-300", lambda: np.linspace(1e-300, 2e-300, H * W).reshape(H, W), "collapses in float32")
_image_case("uint32-near-4e9", lambda: (4_000_000_000 + np.arange(H * W, dtype=np.uint32) % 100).reshape(H, W),
            "collapses in float32")
_image_case("int64-near-9e18", lambda: (9 * 10**18 + np.arange(H * W, dtype=np.int64)).reshape(H, W),
            "collapses in float32")
_image_case("float64-tiny-range", lambda: 1.0 + np.linspace(0, 1e-12, H * W).reshape(H, W), "collapses in float32")
_image_case("nan-in-ais", lambda: np.full((H, W), np.nan, np.float32), "NaN or infinite", command="ais")
_image_case("stack-8-slices", stack8, "stack of 8 slices")
_image_case("stack-in-ais-folder", stack8, "stack of 8 slices", command="ais-folder")  # a folder holds 2D images
_image_case("5d", lambda: np.zeros((2, 2, 2, 16, 16), np.uint8), "images are (y, x)")
_image_case("4d-7-channels", lambda: np.zeros((2, 16, 16, 7), np.uint8), "at most 4 channels")
_image_case("1d", lambda: np.arange(64, dtype=np.uint8), "images are (y, x)")
_image_case("complex", lambda: np.ones((H, W), np.complex64), "numeric")


@case("image-missing")
def _(ws):
    return ws.segment(image="missing.tif"), "no image at"


@case("image-is-a-folder")
def _(ws):
    (ws.root / "imgdir").mkdir()
    return ws.segment(image="imgdir"), "a folder"


@case("image-png-header-declares-2.5-gigapixels")
def _(ws):
    ws.write("huge.png", png_header_only(50_000, 50_000))
    return ws.segment(image="huge.png"), "pixel budget"


@case("embed-stack-to-npz", rc=2)
def _(ws):
    ws.write("stack.tif", stack8())
    return ws.embed("--out", ws.p("e.npz"), image="stack.tif"), "holds a stack"


@case("embed-stack-flag-on-2d", rc=2)
def _(ws):
    return ws.embed("--cache", ws.p("c.zarr"), "--stack"), "--stack needs"


@case("ais-folder-without-images")
def _(ws):
    (ws.root / "noimages").mkdir()
    (ws.root / "noimages" / "notes.txt").write_text("x")
    return ws.auto("ais", image="noimages", out="outdir"), "no images"


@case("setting-max-pixels-not-a-number")
def _(ws):
    os.environ["USAM_MAX_PIXELS"] = "lots"  # restored by the test (monkeypatch)
    return ws.segment(), "USAM_MAX_PIXELS"


# prompts (JSON)
def _json_case(name, data, message, raw=False):
    def fn(ws):
        ws.write("bad.json", data if raw else json.dumps(data))
        return ws.segment(prompts="bad.json"), message
    case(f"prompts-{name}")(fn)


_json_case("invalid-json", "{objects: [", "not valid JSON", raw=True)
_json_case("not-utf8", b"\xff\xfe\x00{\x00}", "not UTF-8", raw=True)
_json_case("top-level-number", 3, "must be a list")
_json_case("dict-without-objects", {"boxes": [[1, 2, 3, 4]]}, "expected {\"objects\"")
_json_case("no-objects", {"objects": []}, "holds no objects")
_json_case("object-is-a-list", {"objects": [[1, 2, 3, 4]]}, "object 0")
_json_case("unknown-field", {"objects": [{"boxes": [1, 2, 3, 4]}]}, "field 'boxes'")
_json_case("box-of-3", {"objects": [{"box": [1, 2, 3]}]}, "field 'box'")
_json_case("box-x1-lt-x0", {"objects": [{"box": [4, 4, 30, 30]}, {"box": [30, 4, 10, 30]}]}, "object 1: field 'box'")
_json_case("box-string", {"objects": [{"box": [1, "2", 3, 4]}]}, "expected a number")
_json_case("box-nan", '{"objects": [{"box": [1, NaN, 3, 4]}]}', "not a finite number", raw=True)
_json_case("box-infinity", '{"objects": [{"box": [1, 2, Infinity, 4]}]}', "not a finite number", raw=True)
_json_case("box-bool", {"objects": [{"box": [True, 2, 3, 4]}]}, "expected a number")
_json_case("box-huge-int", '{"objects": [{"box": [1, 2, 1' + "0" * 400 + ', 4]}]}', "not a finite number", raw=True)
_json_case("points-not-pairs", {"objects": [{"points": [[1, 2, 3]]}]}, "field 'points'")
_json_case("points-not-a-list", {"objects": [{"points": "1,2"}]}, "field 'points'")
_json_case("labels-mismatch", {"objects": [{"points": [[1, 2]], "labels": [1, 1]}]}, "1 points but 2 labels")
_json_case("label-2", {"objects": [{"points": [[1, 2]], "labels": [2]}]}, "labels are 1")
_json_case("labels-without-points", {"objects": [{"box": [1, 2, 3, 4], "labels": [1]}]}, "labels without points")
_json_case("no-prompt", {"objects": [{}]}, "no prompt")
_json_case("point-outside", {"objects": [{"points": [[1000, 5]]}]}, "outside the image")
_json_case("box-negative", {"objects": [{"box": [-5, 2, 10, 10]}]}, "outside the image")
_json_case("box-beyond-width", {"objects": [{"box": [10, 2, W + 1, 10]}]}, "outside the image")
_json_case("deeply-nested", "[" * 100_000 + "]" * 100_000, "prompt file", raw=True)


@case("prompts-missing")
def _(ws):
    return ws.segment(prompts="missing.json"), "no prompt file"


@case("prompts-is-a-folder")
def _(ws):
    (ws.root / "p.json").mkdir()
    return ws.segment(prompts="p.json"), "a folder"


@case("prompts-wrong-suffix")
def _(ws):
    ws.write("p.txt", json.dumps(GOOD_PROMPTS))
    return ws.segment(prompts="p.txt"), "are .json or .csv"


# prompts (CSV)
def _csv_case(name, text, message):
    def fn(ws):
        ws.write("bad.csv", text)
        return ws.segment(prompts="bad.csv"), message
    case(f"prompts-csv-{name}")(fn)


_csv_case("missing-column", "object,x,y\na,1,2\n", "missing column(s) kind")
_csv_case("empty-file", "", "missing column(s)")
_csv_case("header-only", "object,kind,x,y,label,x1,y1\n", "holds no objects")
_csv_case("bad-kind", "object,kind,x,y\na,circle,1,2\n", "field 'kind'")
_csv_case("x-not-a-number", "object,kind,x,y\na,point,one,2\n", "field 'x'")
_csv_case("missing-y", "object,kind,x,y\na,point,1,\n", "missing value")
_csv_case("short-row", "object,kind,x,y\na,point,1\n", "field 'y'")
_csv_case("box-without-x1-column", "object,kind,x,y\na,box,1,2\n", "needs the column x1")
_csv_case("box-x1-lt-x0", "object,kind,x,y,label,x1,y1\na,box,20,2,,10,10\n", "x1 >= x0")
_csv_case("label-2", "object,kind,x,y,label\na,point,1,2,2\n", "field 'label'")
_csv_case("nan", "object,kind,x,y\na,point,nan,2\n", "not a finite number")
_csv_case("two-boxes", "object,kind,x,y,label,x1,y1\na,box,1,1,,5,5\na,box,2,2,,6,6\n", "second box")
_csv_case("empty-object-name", "object,kind,x,y\n,point,1,2\n", "field 'object'")
_csv_case("point-outside", "object,kind,x,y\ncell-7,point,5,900\n", "object 'cell-7': field 'points'")
_csv_case("not-utf8", "object,kind,x,y\n\xe9,point,1,2\n".encode("latin-1"), "not UTF-8")


# outputs
@case("out-is-the-image")
def _(ws):
    return ws.segment(out="img.tif"), "is the --image input"


@case("out-is-a-hard-link-to-the-image")
def _(ws):
    os.link(ws.root / "img.tif", ws.root / "link.tif")
    return ws.segment(out="link.tif"), "is the --image input"


@case("out-is-a-symlink-to-the-image")
def _(ws):
    os.symlink(ws.root / "img.tif", ws.root / "sym.tif")
    return ws.segment(out="sym.tif"), "is the --image input"


@case("out-is-the-prompts-json")
def _(ws):
    return ws.segment(out="prompts.json"), "label images are written as TIFF"


@case("out-is-a-hard-link-to-the-prompts")
def _(ws):
    os.link(ws.root / "prompts.json", ws.root / "p.tif")
    return ws.segment(out="p.tif"), "is the --prompts input"


@case("out-is-the-embeddings")
def _(ws):
    npz_for(ws, ws.image, "e.tif")
    return ws.segment("--embeddings", ws.p("e.tif"), out="e.tif"), "is the --embeddings input"


@case("overlay-is-out")
def _(ws):
    return ws.segment("--overlay", ws.p("labels.tif")), "are the same file"


@case("overlay-is-the-image")
def _(ws):
    return ws.segment("--overlay", ws.p("img.tif")), "is the --image input"


@case("out-is-a-folder")
def _(ws):
    (ws.root / "outdir.tif").mkdir()
    return ws.segment(out="outdir.tif"), "is a folder"


@case("out-unwritable")
def _(ws):
    return ws.segment(out="/proc/usam-no-such/labels.tif"), "cannot write"


@case("out-parent-is-a-file")
def _(ws):
    ws.write("afile", "x")
    return ws.segment(out="afile/labels.tif"), "is a file, not a folder"


@case("out-exists-without-overwrite")
def _(ws):
    ws.write("labels.tif", np.ones((H, W), np.uint32))
    return ws.segment(), "pass --overwrite"


@case("out-jpg")
def _(ws):
    return ws.segment(out="labels.jpg"), "label images are written as TIFF"


@case("out-without-suffix")
def _(ws):
    return ws.segment(out="labels"), "label images are written as TIFF"


@case("overlay-jpg")
def _(ws):
    return ws.segment("--overlay", ws.p("o.jpg")), "overlays are written as PNG"


@case("out-png-for-65536-objects")
def _(ws):
    ws.write("many.json", {"objects": [{"box": [1, 1, 2, 2]}] * 65536})
    return ws.segment(prompts="many.json", out="labels.png"), "do not fit a 16-bit PNG"


@case("embed-out-is-a-hard-link-to-the-image")
def _(ws):
    os.link(ws.root / "img.tif", ws.root / "e.npz")
    return ws.embed("--out", ws.p("e.npz")), "is the --image input"


@case("embed-out-npy")
def _(ws):
    return ws.embed("--out", ws.p("e.npy")), "embeddings are written as .npz"


@case("embed-out-exists-without-overwrite")
def _(ws):
    npz_for(ws, ws.image)
    return ws.embed("--out", ws.p("e.npz")), "pass --overwrite"


@case("embed-out-is-a-folder")
def _(ws):
    (ws.root / "e.npz").mkdir()
    return ws.embed("--out", ws.p("e.npz")), "is a folder"


@case("embed-cache-is-the-image")
def _(ws):
    return ws.embed("--cache", ws.p("img.tif")), "is the --image input"


@case("embed-cache-is-a-file")
def _(ws):
    ws.write("c.zarr", "x")
    return ws.embed("--cache", ws.p("c.zarr")), "is a file"


@case("embed-cache-is-the-image-folder")
def _(ws):
    ws.write("images/a.tif", ws.image)
    return ws.embed("--cache", ws.p("images"), image="images"), "is the --image input"


@case("ais-out-is-the-image")
def _(ws):
    return ws.auto("ais", out="img.tif"), "is the --image input"


@case("amg-out-exists-without-overwrite")
def _(ws):
    ws.write("labels.tif", np.ones((H, W), np.uint32))
    return ws.auto("amg"), "pass --overwrite"


@case("ais-overlay-is-out")
def _(ws):
    return ws.auto("ais", "--overlay", ws.p("labels.tif")), "are the same file"


@case("ais-folder-out-is-the-image-folder")
def _(ws):
    ws.write("images/a.tif", ws.image)
    return ws.auto("ais", image="images", out="images"), "is the --image input"


@case("ais-folder-out-is-a-tif", rc=2)
def _(ws):
    ws.write("images/a.tif", ws.image)
    return ws.auto("ais", image="images", out="x.tif"), "must be a folder"


@case("amg-out-bmp")
def _(ws):
    return ws.auto("amg", out="labels.bmp"), "label images are written as TIFF"


@case("amg-tile-shape-with-embeddings", rc=2)
def _(ws):
    npz_for(ws, ws.image)
    return ws.auto("amg", "--embeddings", ws.p("e.npz"), "--tile-shape", "32", "32"), "read from the embedding cache"


def _evaluate(ws, out, *extra):
    return ["evaluate", "--model", ws.model, "--data", ws.p("data"), "--out", ws.p(out), "--quiet", *extra]


@case("evaluate-out-is-a-file")
def _(ws):
    ws.write("report.txt", "x")
    return _evaluate(ws, "report.txt"), "is a file"


@case("evaluate-out-holds-a-report")
def _(ws):
    ws.write("rep/report.md", "# old report")
    return _evaluate(ws, "rep"), "pass --overwrite"


@case("evaluate-out-is-the-data")
def _(ws):
    ws.write("data/splits.json", {"test": []})
    return _evaluate(ws, "data"), "is the --data input"


@case("evaluate-data-missing")
def _(ws):
    return _evaluate(ws, "rep"), "splits.json"


@case("export-overwrite-folder-of-other-files")
def _(ws):
    ws.write("mine/thesis.txt", "years of work")
    return ["export", ws.p("ckpt.pt"), "--out", ws.p("mine"), "--overwrite", "--quiet"], "no family.yaml"


@case("export-family-without-overwrite")
def _(ws):
    ws.write("fam/family.yaml", "name: x\n")
    ws.write("fam/image_encoder.zip", b"zip")
    return ["export", ws.p("ckpt.pt"), "--out", ws.p("fam"), "--quiet"], "holds a family already"


@case("export-out-is-a-file")
def _(ws):
    ws.write("fam.zip", b"x")
    return ["export", ws.p("ckpt.pt"), "--out", ws.p("fam.zip"), "--quiet"], "is not a folder"


# embeddings and caches
@case("embeddings-missing")
def _(ws):
    return ws.segment("--embeddings", ws.p("none.npz")), "no embeddings at"


@case("embeddings-npz-truncated")
def _(ws):
    data = Path(npz_for(ws, ws.image)).read_bytes()
    ws.write("e.npz", data[: len(data) // 2])
    return ws.segment("--embeddings", ws.p("e.npz")), "cannot read embeddings"


@case("embeddings-npz-random-bytes")
def _(ws):
    ws.write("e.npz", os.urandom(1000))
    return ws.segment("--embeddings", ws.p("e.npz")), "cannot read embeddings"


@case("embeddings-npz-without-image-hash")
def _(ws):
    npz_for(ws, ws.image, data_sha256=None)
    return ws.segment("--embeddings", ws.p("e.npz")), "re-run `usam embed"


@case("embeddings-npz-of-another-image")
def _(ws):
    npz_for(ws, ws.image[::-1])
    return ws.segment("--embeddings", ws.p("e.npz")), "computed for another image"


@case("embeddings-npz-without-features")
def _(ws):
    npz_for(ws, ws.image, features=None)
    return ws.segment("--embeddings", ws.p("e.npz")), "no features"


@case("embeddings-npz-object-array")
def _(ws):
    npz_for(ws, ws.image, features=np.array([{"evil": 1}], dtype=object))
    return ws.segment("--embeddings", ws.p("e.npz")), "cannot read embeddings"


@case("embeddings-npz-wrong-shape")
def _(ws):
    npz_for(ws, ws.image, features=np.zeros((3, 3), np.float32))
    return ws.segment("--embeddings", ws.p("e.npz")), "not a file of `usam embed --out`"


@case("embeddings-npz-for-ais-of-another-image")
def _(ws):
    npz_for(ws, ws.image + 1)
    return ws.auto("ais", "--embeddings", ws.p("e.npz")), "computed for another image"


@case("cache-of-another-image")
def _(ws):
    write_cache(ws.root / "c.zarr", ws.image[:, ::-1])
    return ws.segment("--embeddings", ws.p("c.zarr")), "computed for another image"


@case("cache-not-a-cache")
def _(ws):
    ws.write("c.zarr/readme.txt", "x")
    return ws.segment("--embeddings", ws.p("c.zarr")), "no embedding cache"


@case("cache-damaged-metadata")
def _(ws):
    write_cache(ws.root / "c.zarr", ws.image)
    for meta in ("zarr.json", ".zattrs"):
        if (ws.root / "c.zarr" / meta).exists():
            (ws.root / "c.zarr" / meta).write_text("{ not json")
    return ws.segment("--embeddings", ws.p("c.zarr")), "cannot be opened"


@case("cache-of-a-stack")
def _(ws):
    stack = stack8()
    ws.write("stack.tif", stack)
    write_cache(ws.root / "c.zarr", stack, stack=True)
    ws.write("slice.tif", stack[0])
    return ws.segment("--embeddings", ws.p("c.zarr"), image="slice.tif"), "computed for another image"


@case("stack-in-ais-to-png")
def _(ws):
    ws.write("stack.tif", stack8())
    return ws.auto("ais", image="stack.tif", out="labels.png"), "3D TIFF"


@case("stack-in-amg-cache-of-5-slices")
def _(ws):
    stack = stack8()
    ws.write("stack.tif", stack)
    write_cache(ws.root / "c.zarr", stack[:5], stack=True)
    return ws.auto("amg", "--embeddings", ws.p("c.zarr"), image="stack.tif"), "holds 5 slices"


@case("embed-cache-of-another-image")
def _(ws):
    write_cache(ws.root / "c.zarr", ws.image[::-1])
    return ws.embed("--cache", ws.p("c.zarr")), "computed for another image"


# packages (the loader's messages)
@case("model-missing")
def _(ws):
    return ws.segment(), "no package at"


@case("model-empty-folder")
def _(ws):
    (ws.root / "fam").mkdir()
    return ws.segment(model=ws.p("fam")), "holds no usam-bioimageio packages"


@case("model-not-a-zip")
def _(ws):
    ws.write("model.zip", b"PK but not really a zip" * 10)
    return ws.segment(model=ws.p("model.zip")), "not a valid zip"


@case("model-is-an-image")
def _(ws):
    return ws.segment(model=ws.p("img.tif"), out="o.tif"), "neither a package folder"


@case("model-broken-family-yaml")
def _(ws):
    ws.write("fam/family.yaml", "packages: [unclosed")
    return ws.segment(model=ws.p("fam")), "family.yaml"


# usam train: its output, checked before any data is read or a model is built
def _train(ws, out, *extra, data=None):
    if data is None:
        ws.write("train/images/a.tif", ws.image)
        ws.write("train/labels/a.tif", (ws.image > 2000).astype(np.uint16))
        data = ["--train-images", ws.p("train/images"), "--train-labels", ws.p("train/labels")]
    return ["train", *data, "--output", ws.p(out) if not out.startswith("/") else out, "--model-type", "vit_t",
            *extra]


@case("train-output-is-the-train-images")
def _(ws):
    return _train(ws, "train/images"), "is the --train-images input"


@case("train-output-is-the-data")
def _(ws):
    ws.write("data/splits.json", {"train": [], "val": []})
    return _train(ws, "data", data=["--data", ws.p("data")]), "is the --data input"


@case("train-output-is-the-checkpoint-folder")
def _(ws):
    ws.write("run/best.pt", b"x")
    return _train(ws, "run", "--checkpoint", ws.p("run")), "is the --checkpoint input"


@case("train-output-holds-checkpoints")
def _(ws):
    ws.write("run/latest.pt", b"old run")
    return _train(ws, "run"), "pass --overwrite"


@case("train-output-holds-other-files")
def _(ws):
    ws.write("run/thesis.txt", "years of work")
    return _train(ws, "run", "--checkpoint", ws.p("img.tif")), "is not empty"


@case("train-output-is-a-file")
def _(ws):
    ws.write("run", "x")
    return _train(ws, "run"), "is a file"


@case("train-output-unwritable")
def _(ws):
    return _train(ws, "/proc/usam-no-such/run"), "cannot write"


@case("train-labels-missing")
def _(ws):
    ws.write("train/images/a.tif", ws.image)
    return _train(ws, "run", data=["--train-images", ws.p("train/images"), "--train-labels",
                                   ws.p("train/none")]), "no such folder"


# usam evaluate: a folder holding only the plots of a report is a report
@case("evaluate-out-holds-report-plots")
def _(ws):
    ws.write("rep/automatic.png", png_bytes(np.zeros((4, 4), np.uint8)))
    return _evaluate(ws, "rep"), "pass --overwrite"


# usam ais / amg on a folder: a bad fifth image (or its embeddings) fails before the model loads, nothing written
def _folder_with_bad_fifth(ws, name, data):
    for stem in "abcd":
        ws.write(f"images/{stem}.tif", ws.image)
    ws.write(f"images/{name}", data)


@case("ais-folder-fifth-image-is-a-stack")
def _(ws):
    _folder_with_bad_fifth(ws, "e.tif", stack8())
    return ws.auto("ais", image="images", out="out"), "e.tif holds a stack of 8 slices"


@case("ais-folder-fifth-png-declares-2.5-gigapixels")
def _(ws):
    _folder_with_bad_fifth(ws, "e.png", png_header_only(50_000, 50_000))
    return ws.auto("ais", image="images", out="out"), "pixel budget"


@case("amg-folder-fifth-image-nan")
def _(ws):
    _folder_with_bad_fifth(ws, "e.tif", np.full((H, W), np.nan, np.float32))
    return ws.auto("amg", image="images", out="out"), "NaN or infinite"


@case("amg-folder-fifth-image-unreadable")
def _(ws):
    _folder_with_bad_fifth(ws, "e.tif", os.urandom(500))
    return ws.auto("amg", image="images", out="out"), "cannot read image"


@case("ais-folder-fifth-embeddings-of-another-image")
def _(ws):
    _folder_with_bad_fifth(ws, "e.tif", ws.image)
    (ws.root / "emb").mkdir()
    for stem in "abcd":
        npz_for(ws, ws.image, f"emb/{stem}.npz")
    npz_for(ws, ws.image[::-1], "emb/e.npz")
    return ws.auto("ais", "--embeddings", ws.p("emb"), image="images", out="out"), "computed for another image"


# micro-sam's caches: checked against the image by the data_signature micro-sam records (sha1 of the pixels)
@case("cache-micro-sam-of-another-image")
def _(ws):
    import shutil

    shutil.copytree(Path(__file__).parent / "data" / "micro_sam_caches" / "2d.zarr", ws.root / "ms.zarr")
    return ws.segment("--embeddings", ws.p("ms.zarr")), "data_signature"


@case("cache-micro-sam-3d-of-another-stack")
def _(ws):
    import shutil

    shutil.copytree(Path(__file__).parent / "data" / "micro_sam_caches" / "3d.zarr", ws.root / "ms.zarr")
    ws.write("stack.tif", stack8())
    return ws.auto("ais", "--embeddings", ws.p("ms.zarr"), image="stack.tif"), "data_signature"


CASE_NAMES = sorted(CASES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("USAM_MAX_PIXELS", "")  # the default; restored afterwards, whatever a case sets
    ws = Workspace(tmp_path / "ws")
    fn, rc = CASES[name]
    argv, message = fn(ws)
    run_failing(tmp_path, argv, rc, message, capsys)


# -- cases that need more than the table: a budget, servers, a model ---------------------------------------------

def test_pixel_budget_refuses_a_small_file_declaring_16384_squared_pixels(big_tiff, tmp_path, capsys, monkeypatch):
    """The ~300 KB TIFF of issue 15 (16384^2 pixels): refused with a low budget before a pixel is decoded
    (fast); the default budget (2^30 pixels) takes it, and real images up to 20k x 20k."""
    assert big_tiff.stat().st_size < 1_000_000
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setenv("USAM_MAX_PIXELS", str(10**6))
    start = time.perf_counter()
    err = run_failing(tmp_path, ws.segment(image=str(big_tiff)), 1, "pixel budget", capsys)
    assert time.perf_counter() - start < 2.0
    assert "268,435,456 pixels" in err and "USAM_MAX_PIXELS" in err
    monkeypatch.delenv("USAM_MAX_PIXELS")
    from usam_bioimageio import settings

    assert settings.max_pixels() == 2**30 >= 20_000 * 20_000 >= 16384**2




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("status,message", [(404, "404"), (500, "500"), (403, "403")])
def test_model_url_http_errors(status, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    ws = Workspace(tmp_path / "ws")
    with answer(status) as url:
        run_failing(tmp_path, ws.segment(model=f"{url}/family/image_encoder.zip"), 1, message, capsys)


@pytest.mark.parametrize("suffix", ["/x.zip", "/rdf.yaml"])
def test_model_url_connection_refused(suffix, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    ws = Workspace(tmp_path / "ws")
    run_failing(tmp_path, ws.segment(model=f"http://127.0.0.1:{free_port()}{suffix}"), 1, "refused", capsys)


@pytest.mark.parametrize("damage,message", [("truncated", "cannot be read"), ("deleted", "missing or changed")])
def test_damaged_cache_chunk_is_refused_after_the_model_loads(damage, message, vit_t_family, tmp_path, capsys,
                                                              monkeypatch):
    """A damaged features chunk is found when it is read (after the model loads): a message, no traceback; a
    deleted one too (zarr would read zeros: the item's checksum shows it)."""
    from usam_bioimageio.runtime.packages import load_family

    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    ws = Workspace(tmp_path / "ws")
    identity = load_family(vit_t_family[0]).get("image_encoder").identity
    cache = write_cache(ws.root / "c.zarr", ws.image, identity=identity)
    chunks = [p for p in (cache / "features").rglob("*") if p.is_file() and p.name not in
              ("zarr.json", ".zarray", ".zattrs")]
    assert chunks
    for chunk in chunks:
        if damage == "deleted":
            chunk.unlink()
        else:
            chunk.write_bytes(chunk.read_bytes()[:50])
    run_failing(tmp_path, ws.segment("--embeddings", str(cache), model=str(vit_t_family[0])), 1, message, capsys)


def test_debug_shows_the_traceback(tmp_path):
    ws = Workspace(tmp_path)
    from usam_bioimageio.errors import InputError

    with pytest.raises(InputError, match="no image at"):
        main(["--debug"] + ws.segment(image="missing.tif"))


def test_unexpected_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """A bug of ours (here: a TypeError) is one line saying so and pointing at --debug, exit 1."""
    import usam_bioimageio.cli.segment as segment

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(segment, "read_image_2d", broken)
    ws = Workspace(tmp_path)
    assert main(ws.segment()) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: unsupported operand" in err and "--debug" in err
    assert len(err.strip().splitlines()) == 1


# -- the output rule, positive side: --overwrite, PNG labels, the export swap ----------------------------------

def test_overwrite_rule_and_label_formats(tmp_path):
    from usam_bioimageio.cli.files import Output, check_outputs, write_labels
    from usam_bioimageio.errors import OutputError

    out = tmp_path / "labels.png"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_outputs([Output("--out", out, "labels")], [], overwrite=False)
    check_outputs([Output("--out", out, "labels")], [], overwrite=True)
    labels = np.arange(H * W, dtype=np.uint32).reshape(H, W) * 20
    with pytest.raises(OutputError, match="16-bit PNG"):
        write_labels(out, labels)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.png"]
    write_labels(out, labels % 65536)
    from usam_bioimageio.io.images import read_image

    back = read_image(out)
    assert back.dtype == np.uint16 and np.array_equal(back, labels % 65536)
    write_labels(tmp_path / "labels.tif", labels)
    assert np.array_equal(tifffile.imread(tmp_path / "labels.tif"), labels)
    assert not list(tmp_path.glob(".*part"))


def test_export_swaps_a_family_in_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    """export --overwrite replaces a family (family.yaml) via rename-aside: a failing swap restores the old one."""
    import usam_exporters.family as family

    old = tmp_path / "fam"
    (old).mkdir()
    (old / "family.yaml").write_text("name: old\n")
    new = tmp_path / ".fam-staging"
    new.mkdir()
    (new / "family.yaml").write_text("name: new\n")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == new:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(family.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        family._swap_in(new, old, overwrite=True)
    assert (old / "family.yaml").read_text() == "name: old\n"
    monkeypatch.setattr(family.os, "replace", real_replace)
    family._swap_in(new, old, overwrite=True)
    assert (old / "family.yaml").read_text() == "name: new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam"]
    # an empty folder is written into; a folder of other files never
    empty = tmp_path / "empty"
    empty.mkdir()
    family._check_replaceable(empty, overwrite=False)
    (empty / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no family.yaml"):
        family._check_replaceable(empty, overwrite=True)


# -- gaps of the first pass: caches, ais / amg outputs, usam train, the evaluate report ----------------------------

def _feature_chunks(cache: Path) -> list:
    return [p for p in (cache / "features").rglob("*") if p.is_file() and p.name not in
            ("zarr.json", ".zarray", ".zattrs")]


@pytest.mark.parametrize("damage", ["deleted", "replaced"])
def test_damaged_chunk_of_a_complete_cache_is_an_error_not_zeros(damage, tmp_path):
    """zarr reads a deleted chunk as its fill value (zeros) and a chunk copied from elsewhere decodes fine: the
    checksum written with each item shows both, naming the cache and what to do."""
    from usam_bioimageio.embeddings.cache import load_cache
    from usam_bioimageio.errors import CacheDamagedError

    image = np.random.default_rng(0).integers(0, 4000, size=(H, W), dtype=np.uint16)
    cache = write_cache(tmp_path / "c.zarr", image)
    assert np.all(load_cache(cache)[0].features == 0.5)
    (chunk,) = _feature_chunks(cache)
    if damage == "deleted":
        chunk.unlink()
    else:  # a valid chunk of other features: same shape, same codecs
        other = write_cache(tmp_path / "other.zarr", image, value=0.25)
        chunk.write_bytes(_feature_chunks(other)[0].read_bytes())
    with pytest.raises(CacheDamagedError, match="c.zarr.*missing or changed.*delete the cache and compute it again"):
        load_cache(cache)[0]


_FAKE_MODEL = types.SimpleNamespace(pixel_scale=1.0)  # what `usam ais` reads of a model besides the faked calls


def _fake_automatic(monkeypatch, labels):
    """usam ais without a model: the model, the embeddings and the segmentation are stand-ins."""
    import usam_bioimageio.automatic.ais.decoder as decoder
    import usam_bioimageio.cli.automatic as automatic
    from usam_bioimageio.runtime.model import SamModel

    monkeypatch.setattr(SamModel, "load", classmethod(lambda cls, *args, **kwargs: _FAKE_MODEL))
    monkeypatch.setattr(automatic, "_embeddings_for_job", lambda *args, **kwargs: None)
    monkeypatch.setattr(decoder, "automatic_instance_segmentation", lambda *args, **kwargs: labels)


def test_ais_png_of_more_than_65535_labels_writes_nothing(tmp_path, capsys, monkeypatch):
    """Found only after segmenting: refused before the label PNG or the overlay is written."""
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    _fake_automatic(monkeypatch, np.arange(1, H * W + 1, dtype=np.uint32).reshape(H, W) * 20)
    ws = Workspace(tmp_path / "ws")
    run_failing(tmp_path, ws.auto("ais", "--overlay", ws.p("o.png"), out="labels.png"), 1,
                "do not fit a 16-bit PNG", capsys)


def test_ais_folder_checks_every_image_then_writes_every_result(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    _fake_automatic(monkeypatch, np.ones((H, W), np.uint32))
    ws = Workspace(tmp_path / "ws")
    for stem in "abcde":
        ws.write(f"images/{stem}.tif", ws.image)
    assert main(ws.auto("ais", "--overlay", ws.p("ov"), image="images", out="out")) == 0
    assert sorted(p.name for p in (ws.root / "out").iterdir()) == [f"{s}.tif" for s in "abcde"]
    assert sorted(p.name for p in (ws.root / "ov").iterdir()) == [f"{s}.png" for s in "abcde"]


def test_ais_folder_pipeline_keeps_each_image_with_its_own_result(tmp_path, capsys, monkeypatch):
    """The next image's embeddings are computed while this one is segmented: every result is its own image's;
    an image failing midway is one error line, the results before it stay written, none after it."""
    import usam_bioimageio.automatic.ais.decoder as decoder
    import usam_bioimageio.cli.automatic as automatic
    from usam_bioimageio.runtime.model import SamModel

    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(SamModel, "load", classmethod(lambda cls, *args, **kwargs: _FAKE_MODEL))

    def embeddings(model, image, *args, **kwargs):
        if int(image[0, 0]) == 4:
            raise ValueError("image 4 cannot be embedded")
        return int(image[0, 0])  # stands for this image's embeddings

    monkeypatch.setattr(automatic, "_embeddings_for_job", embeddings)
    monkeypatch.setattr(decoder, "automatic_instance_segmentation",
                        lambda model, image, embeddings, **kwargs: np.full(image.shape, 10 * embeddings + image[0, 0],
                                                                           np.uint32))
    ws = Workspace(tmp_path / "ws")
    values = [1, 2, 3, 5]
    for k, v in enumerate(values):
        ws.write(f"images/{k}.tif", np.full((H, W), v, np.uint16))
    assert main(ws.auto("ais", image="images", out="out")) == 0
    for k, v in enumerate(values):
        assert np.all(tifffile.imread(ws.root / "out" / f"{k}.tif") == 11 * v)
    ws.write("images/3.tif", np.full((H, W), 4, np.uint16))
    ws.write("images/4.tif", np.full((H, W), 6, np.uint16))
    capsys.readouterr()
    assert main(ws.auto("ais", image="images", out="out2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image 4 cannot be embedded" in err[0]
    assert sorted(p.name for p in (ws.root / "out2").iterdir()) == ["0.tif", "1.tif", "2.tif"]


def test_train_output_resumed_or_overwritten(tmp_path):
    """A non-empty --output is taken when resuming from a checkpoint in it, or with --overwrite."""
    from usam_bioimageio.cli.train import check_train_output
    from usam_bioimageio.errors import OutputError

    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.pt").write_bytes(b"checkpoint")
    inputs = [("--data", tmp_path)]
    check_train_output(run, inputs, str(run / "latest.pt"), overwrite=False)  # resuming
    check_train_output(run, inputs, None, overwrite=True)
    check_train_output(tmp_path / "new", inputs, None, overwrite=False)
    with pytest.raises(OutputError, match="resume with --checkpoint"):
        check_train_output(run, inputs, None, overwrite=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["latest.pt", "run"]


def test_evaluate_report_is_swapped_in_and_a_failure_leaves_the_old_one(tmp_path, monkeypatch):
    from usam_bioimageio.evaluation import report

    scores = {"msa": 0.5, "sa50": 0.6, "sa75": 0.4}
    results = {"n_val": 1, "n_test": 2, "baseline": scores, "ais": {"best": {"t": 1}, "test": scores}}
    report.write_report(results, tmp_path / "rep", title="first", command="usam evaluate")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["automatic.png", "report.md", "results.json"]
    before = snapshot(tmp_path)
    plot = report._plot

    def failing(path, draw):  # the second plot fails: the first one was written already
        if path.name == "automatic.png":
            raise OSError("No space left on device")
        plot(path, draw)

    monkeypatch.setattr(report, "_plot", failing)
    interactive = {"box": {k: [0.1, 0.2] for k in scores}}
    with pytest.raises(OSError, match="No space"):
        report.write_report({**results, "interactive": interactive}, tmp_path / "rep", title="second", command="x")
    assert snapshot(tmp_path) == before  # no partial report, no staging folder
    monkeypatch.setattr(report, "_plot", plot)
    # a folder with the user's other files keeps them; a plot the new report lacks is removed
    (tmp_path / "rep" / "notes.txt").write_text("mine")
    report.write_report({"n_val": 0, "n_test": 2, "interactive": interactive}, tmp_path / "rep", title="third",
                        command="x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["interactive.png", "notes.txt", "rep", "report.md",
                                                           "results.json"]
    assert "# third" in (tmp_path / "rep" / "report.md").read_text()
    # --out . (the working directory, here holding only a report) is written into, never renamed away
    (tmp_path / "rep" / "notes.txt").unlink()
    inode = (tmp_path / "rep").stat().st_ino
    monkeypatch.chdir(tmp_path / "rep")
    report.write_report(results, Path("."), title="fourth", command="x")
    assert (tmp_path / "rep").stat().st_ino == inode and "# fourth" in Path("report.md").read_text()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["automatic.png", "rep", "report.md", "results.json"]


# -- property-based fuzzing of the readers ---------------------------------------------------------------------

from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["objects", "points", "labels", "box", "x"]) | st.text(max_size=3), children, max_size=4),
    max_leaves=30)


def _only_our_errors(fn):
    """Call ``fn``; a UsamError is fine, any other exception fails the property."""
    try:
        return fn()
    except UsamError:
        return None


@contextlib.contextmanager
def _file(suffix: str, data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"f{suffix}"
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", errors="surrogatepass"))
        yield path


def _check_prompts(path):
    from usam_bioimageio.io.prompt_files import ObjectPrompt, check_prompts_inside, read_prompts

    objects = _only_our_errors(lambda: read_prompts(path))
    if objects is not None:
        assert objects and all(isinstance(o, ObjectPrompt) for o in objects)
        for o in objects:
            assert o.points is not None or o.box is not None
            for a in (o.points, o.box):
                assert a is None or np.all(np.isfinite(a))
        _only_our_errors(lambda: check_prompts_inside(objects, (H, W), path))


@FUZZ
@given(JSON_VALUES)
def test_fuzz_prompt_json_structures(value):
    with _file(".json", json.dumps(value, allow_nan=True)) as path:
        _check_prompts(path)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_fuzz_prompt_text(text):
    for suffix in (".json", ".csv"):
        with _file(suffix, text) as path:
            _check_prompts(path)


CSV_CELLS = st.sampled_from(["", "1", "0", "2", "-3", "1e400", "nan", "inf", "point", "box", "a", "b", " ", "x,y",
                             "\"", "1.5", "99999"])


@FUZZ
@given(st.lists(st.sampled_from(["object", "kind", "x", "y", "label", "x1", "y1", "z"]), min_size=0, max_size=8),
       st.lists(st.lists(CSV_CELLS, max_size=8), max_size=6))
def test_fuzz_prompt_csv(header, rows):
    text = "\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n"
    with _file(".csv", text) as path:
        _check_prompts(path)


def _check_image(path):
    from usam_bioimageio.io.images import read_image

    image = _only_our_errors(lambda: read_image(path))
    if image is not None:
        assert isinstance(image, np.ndarray) and image.ndim in (2, 3, 4) and image.size > 0


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif"]))
def test_fuzz_image_random_bytes(data, suffix):
    with _file(suffix, data) as path:
        _check_image(path)


@FUZZ
@given(st.sampled_from([b"II*\x00", b"MM\x00*", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM"]),
       st.binary(max_size=400), st.sampled_from([".tif", ".png", ".jpg", ".bmp"]))
def test_fuzz_image_bytes_with_magic(magic, data, suffix):
    with _file(suffix, magic + data) as path:
        _check_image(path)


ARRAY_DTYPES = st.sampled_from([np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32, np.int64, np.float16,
                                np.float32, np.float64, np.bool_])


@FUZZ
@given(hnp.arrays(ARRAY_DTYPES, hnp.array_shapes(min_dims=1, max_dims=5, min_side=1, max_side=6)))
def test_fuzz_image_tiff_arrays(array):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.tif"
        try:
            tifffile.imwrite(path, array)
        except Exception:  # arrays tifffile cannot write (e.g. 1D bool) are not the reader's business
            assume(False)
        _check_image(path)


@FUZZ
@given(hnp.arrays(st.sampled_from([np.uint8, np.uint16]), st.sampled_from([(5, 7), (3, 4), (6, 5, 3), (2, 2, 4),
                                                                           (1, 1)])))
def test_fuzz_image_png_arrays(array):
    from PIL import Image

    if array.ndim == 3 and array.dtype != np.uint8:
        array = array.astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.png"
        Image.fromarray(array).save(path)
        _check_image(path)
