"""usam_bioimageio.training.checkpoints: loading SAM / µSAM checkpoints safely, saving µSAM's layout."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from loopback import serve
from usam_bioimageio import registry
from usam_bioimageio.errors import ChecksumError
from usam_bioimageio.modeling import seeded_sam
from usam_bioimageio.training.checkpoints import Checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def sam_state():
    return {k: v.clone() for k, v in seeded_sam("vit_t").state_dict().items()}


@pytest.fixture(scope="module")
def decoder_state():
    g = torch.Generator().manual_seed(1)
    return {
        "decoder.samplers.0.block.weight": torch.randn(8, 4, 2, 2, generator=g),
        "out_conv.weight": torch.randn(3, 8, 1, 1, generator=g),
        "out_conv.bias": torch.randn(3, generator=g),
    }


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory, sam_state):
    path = tmp_path_factory.mktemp("plain") / "sam_vit_t.pt"
    torch.save(sam_state, path)
    return path


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_plain_state_dict(plain_file, sam_state):
    ckpt = load_checkpoint(plain_file)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.model_type == "vit_t"
    assert ckpt.decoder_state is None and not ckpt.has_decoder
    assert ckpt.source == str(plain_file)
    _same(ckpt.sam_state, sam_state)
    assert load_checkpoint(str(plain_file), model_type="vit_t").model_type == "vit_t"
    assert load_checkpoint(plain_file, model_type="vit_t_lm").model_type == "vit_t"  # a name: its architecture


def test_legacy_torch_format(tmp_path, sam_state):
    path = tmp_path / "legacy.pt"
    torch.save(sam_state, path, _use_new_zipfile_serialization=False)
    _same(load_checkpoint(path).sam_state, sam_state)


def test_usam_layout_without_decoder(tmp_path, sam_state):
    path = tmp_path / "exported.pt"
    torch.save({"model_state": sam_state}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.model_type == "vit_t" and ckpt.decoder_state is None
    _same(ckpt.sam_state, sam_state)


def test_usam_finetuning_checkpoint_prefixed_with_decoder(tmp_path, sam_state, decoder_state):
    # torch_em / µSAM trainer checkpoint: TrainableSAM keys ("sam." prefix), decoder and training bookkeeping.
    path = tmp_path / "best.pt"
    torch.save(
        {
            "model_state": {"sam." + k: v for k, v in sam_state.items()},
            "decoder_state": decoder_state,
            "iteration": 1000,
            "best_metric": 0.25,
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
        },
        path,
    )
    ckpt = load_checkpoint(path)
    assert ckpt.model_type == "vit_t" and ckpt.has_decoder
    _same(ckpt.sam_state, sam_state)
    _same(ckpt.decoder_state, decoder_state)


def test_save_checkpoint_roundtrip(tmp_path, sam_state, decoder_state):
    out = save_checkpoint(tmp_path / "sub" / "with_decoder.pt", sam_state=sam_state, decoder_state=decoder_state)
    assert out == tmp_path / "sub" / "with_decoder.pt"
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert set(raw) == {"model_state", "decoder_state"}
    ckpt = load_checkpoint(out)
    _same(ckpt.sam_state, sam_state)
    _same(ckpt.decoder_state, decoder_state)

    out2 = save_checkpoint(tmp_path / "sub" / "no_decoder.pt", sam_state=sam_state)
    # µSAM reads the mere presence of "decoder_state" as "has a decoder": the key is left out.
    assert set(torch.load(out2, map_location="cpu", weights_only=True)) == {"model_state"}
    assert load_checkpoint(out2).decoder_state is None
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["no_decoder.pt", "with_decoder.pt"]


def test_save_checkpoint_rejects_non_tensors(tmp_path, sam_state):
    with pytest.raises(ValueError, match="tensors"):
        save_checkpoint(tmp_path / "x.pt", sam_state={**sam_state, "bad": 3})
    assert list(tmp_path.iterdir()) == []


def test_compact_checkpoint_roundtrip(tmp_path, sam_state):
    """int8 per output channel: about a quarter of the float32 file, loaded dequantized with each weight
    within half a quantisation step of the original; small tensors exact; a damaged entry is refused."""
    from usam_bioimageio.training.checkpoints import save_compact_checkpoint

    g = torch.Generator().manual_seed(2)
    decoder = {"base.block.1.weight": torch.randn(64, 32, 3, 3, generator=g), "out_conv.bias": torch.randn(3)}
    full = save_checkpoint(tmp_path / "full.pt", sam_state=sam_state, decoder_state=decoder)
    compact = save_compact_checkpoint(tmp_path / "compact.pt", sam_state=sam_state, decoder_state=decoder)
    assert compact.stat().st_size < 0.3 * full.stat().st_size
    ckpt = load_checkpoint(compact)
    assert ckpt.model_type == "vit_t" and set(ckpt.sam_state) == set(sam_state) and set(ckpt.decoder_state) == set(decoder)
    n_quantized = 0
    for original, loaded in [(sam_state, ckpt.sam_state), (decoder, ckpt.decoder_state)]:
        for k, v in original.items():
            got = loaded[k]
            assert got.shape == v.shape and got.dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
            if v.dim() >= 2 and v.numel() >= 4096:
                step = v.abs().flatten(1).amax(1) / 127
                err = (got - v).abs().flatten(1).amax(1)
                assert bool((err <= step / 2 + 1e-7).all()) and not torch.equal(got, v), k
                n_quantized += 1
            else:
                assert torch.equal(got, v), k
    assert n_quantized > 20
    raw = torch.load(compact, weights_only=True)
    raw["decoder_state"]["base.block.1.weight.__scale"] = torch.ones(3)
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="base.block.1.weight"):
        load_checkpoint(tmp_path / "bad.pt")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served_registry(tmp_path, monkeypatch, sam_state, decoder_state):
    """vit_t_lm re-pointed at a local HTTP server (its real files are far too big for a test)."""
    root = tmp_path / "served"
    root.mkdir()
    torch.save(sam_state, root / "vit_t.pt")
    torch.save(decoder_state, root / "vit_t_decoder.pt")
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    with serve(root) as (base, requests):
        entry = dataclasses.replace(
            registry.published_model("vit_t_lm"),
            url=f"{base}/vit_t.pt", sha256=_sha(root / "vit_t.pt"), xxh128=None,
            decoder_url=f"{base}/vit_t_decoder.pt", decoder_sha256=_sha(root / "vit_t_decoder.pt"),
            decoder_xxh128=None,
        )
        monkeypatch.setitem(registry.PUBLISHED_MODELS, "vit_t_lm", entry)
        yield entry, requests, tmp_path / "cache"


def test_registry_name(served_registry, sam_state, decoder_state):
    entry, requests, cache = served_registry
    ckpt = load_checkpoint("vit_t_lm", progress=False)
    assert ckpt.source == "vit_t_lm" and ckpt.model_type == "vit_t"
    _same(ckpt.sam_state, sam_state)
    _same(ckpt.decoder_state, decoder_state)
    assert sorted(requests) == ["/vit_t.pt", "/vit_t_decoder.pt"]
    load_checkpoint("vit_t_lm", model_type="vit_t", progress=False)
    assert len(requests) == 2  # cached
    with pytest.raises(ValueError, match="vit_b"):
        load_checkpoint("vit_t_lm", model_type="vit_b", progress=False)


def test_registry_wrong_hash(served_registry, monkeypatch):
    entry, requests, cache = served_registry
    monkeypatch.setitem(registry.PUBLISHED_MODELS, "vit_t_lm", dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(ChecksumError):
        load_checkpoint("vit_t_lm", progress=False)
    assert list(cache.iterdir()) == []


def test_url_source(tmp_path, monkeypatch, plain_file):
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "cache"))
    with serve(plain_file.parent) as (base, requests):
        ckpt = load_checkpoint(f"{base}/{plain_file.name}", sha256=_sha(plain_file), progress=False)
    assert ckpt.model_type == "vit_t" and ckpt.source.startswith("http://127.0.0.1:")
    assert load_checkpoint(plain_file.as_uri()).model_type == "vit_t"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(FileNotFoundError, match="published model"):
        load_checkpoint("vit_q_lm")


def test_not_a_torch_file(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a torch checkpoint") as info:
        load_checkpoint(junk)
    assert str(junk) in str(info.value)
    html = tmp_path / "page.pt"
    html.write_text("<!DOCTYPE html><html>Access denied</html>")
    with pytest.raises(ValueError, match="HTML"):
        load_checkpoint(html)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(empty)
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_checkpoint(other_zip)


def test_truncated_files(tmp_path, plain_file):
    data = plain_file.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_checkpoint(trunc)
    assert str(trunc) in str(info.value)
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(legacy)


def _pwn(marker):  # would run at unpickling time, were the pickle trusted
    Path(marker).write_text("pwned")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_pwn, (self.marker,))


def test_malicious_pickle_refused(tmp_path, sam_state):
    marker = tmp_path / "pwned"
    for i, obj in enumerate([_Evil(str(marker)), {"model_state": sam_state, "config": _Evil(str(marker))}]):
        path = tmp_path / f"evil{i}.pt"
        torch.save(obj, path)
        with pytest.raises(ValueError, match="untrusted") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
        assert not marker.exists()


def test_not_a_sam_state_dict(tmp_path, sam_state):
    cases = {
        "list": [torch.zeros(3)],
        "other_model": {"conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)},
        "no_mask_decoder": {k: v for k, v in sam_state.items() if not k.startswith("mask_decoder.")},
        "model_state_not_a_dict": {"model_state": torch.zeros(3)},
        "non_tensor_values": {**sam_state, "image_encoder.note": "hello"},
        "bad_decoder": {"model_state": sam_state, "decoder_state": [1, 2]},
    }
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        with pytest.raises(ValueError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value), name


def test_model_type_mismatch(plain_file):
    with pytest.raises(ValueError, match="vit_t.*vit_b"):
        load_checkpoint(plain_file, model_type="vit_b")
    with pytest.raises(ValueError, match="Unknown model type"):
        load_checkpoint(plain_file, model_type="vit_x")
