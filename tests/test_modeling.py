"""Our pure-torch SAM against segment_anything / mobile_sam: state_dict layout and numerics."""

from __future__ import annotations

import pytest
import torch

from reference import build_reference_sam
from usam_bioimageio import registry
from usam_bioimageio.modeling import build_sam, model_type_from_state_dict, seeded_sam

MODEL_TYPES = ["vit_t", "vit_b", "vit_l", "vit_h"]
TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _layout(model: torch.nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def seeded_pairs():
    """model_type -> (our seeded model, the reference with the same weights), built once per module."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            ours = seeded_sam(model_type, seed=0)
            cache[model_type] = (ours, build_reference_sam(model_type, ours.state_dict()))
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_state_dict_layout_matches_reference(model_type):
    # vit_l / vit_h on the meta device: layout only, no memory. mobile_sam cannot be built on meta (it calls
    # .item() while building), but vit_t is small.
    device = "cpu" if model_type == "vit_t" else "meta"
    with torch.device(device):
        ours = build_sam(model_type)
        ref = build_reference_sam(model_type)
    assert _layout(ours) == _layout(ref)
    # non-persistent buffers as SAM: present on the module, absent from the state dict
    assert {"pixel_mean", "pixel_std"} <= {name for name, _ in ours.named_buffers()}
    assert not ours.training


def _encoder_input() -> torch.Tensor:
    return torch.randn(1, 3, registry.IMAGE_SIZE, registry.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", ["vit_t", pytest.param("vit_b", marks=pytest.mark.slow)])
def test_image_encoder_matches_reference(model_type, seeded_pairs):
    ours, ref = seeded_pairs(model_type)
    x = _encoder_input()
    with torch.no_grad():
        emb = ours.image_encoder(x)
        emb_ref = ref.image_encoder(x)
    size = registry.EMBEDDING_SIZE
    assert emb.shape == (1, registry.EMBEDDING_DIM, size, size)
    diff = _max_diff(emb, emb_ref)
    print(f"{model_type} image encoder max abs diff: {diff:.3g}")
    assert diff <= TOL
    # well-scaled test model: LayerNorm2d output with weights around 1
    assert 0.5 < emb.std().item() < 2.0 and emb.abs().max().item() < 20


def test_micro_sam_vit_t_inference_ignores_loaded_attention_biases(seeded_pairs):
    """MobileSAM's builder (which micro-sam uses) caches the attention bias tables at ``eval()`` before it loads
    the weights: its vit_t computes with zero biases. ``as_micro_sam_infers`` reproduces that exactly; our
    default (the loaded biases) is what the reference computes once its cache is refreshed."""
    from reference import mobile_sam
    from usam_bioimageio.training.checkpoints import Checkpoint, as_micro_sam_infers

    ours, refreshed = seeded_pairs("vit_t")
    official = mobile_sam().sam_model_registry["vit_t"]()
    official.eval()  # as build_sam_vit_t does, then loads the checkpoint
    official.load_state_dict(ours.state_dict(), strict=True)
    ckpt = Checkpoint(model_type="vit_t", sam_state=ours.state_dict(), decoder_state=None, source="seeded")
    as_musam = build_sam("vit_t")
    as_musam.load_state_dict(as_micro_sam_infers(ckpt).sam_state, strict=True)
    x = _encoder_input()
    with torch.no_grad():
        got, expected = as_musam.eval().image_encoder(x), official.image_encoder(x)
        loaded = ours.eval().image_encoder(x)
    assert _max_diff(got, expected) <= TOL
    assert _max_diff(loaded, expected) > 1e-3  # the difference is real
    assert _max_diff(loaded, refreshed.image_encoder(x)) <= TOL
    assert as_micro_sam_infers(Checkpoint("vit_b", {}, None, "x")).source == "x"  # other types unchanged


def _prompt_cases(batch: int = 2):
    """(name, points, boxes, masks) prompt sets in the 1024 x 1024 input frame."""
    g = torch.Generator().manual_seed(2)
    coords = torch.rand(batch, 4, 2, generator=g) * registry.IMAGE_SIZE
    labels = torch.tensor([[1, 0, 1, -1], [0, -1, 1, 1]], dtype=torch.float32)[:batch]
    xy0 = torch.rand(batch, 2, generator=g) * 600
    boxes = torch.cat([xy0, xy0 + 50 + torch.rand(batch, 2, generator=g) * 300], dim=1)
    size = registry.LOW_RES_MASK_SIZE
    masks = torch.randn(batch, 1, size, size, generator=g) * 5
    return [
        ("points", (coords, labels), None, None),  # + SAM's padding point
        ("int_labels", (coords, labels.long()), None, None),
        ("boxes", None, boxes, None),
        ("points_boxes", (coords, labels), boxes, None),  # no padding point
        ("masks", None, None, masks),
        ("all", (coords, labels), boxes, masks),
        ("nothing", None, None, None),  # no sparse tokens at all
    ]


@pytest.mark.parametrize("model_type", ["vit_t", "vit_b"])
def test_prompt_encoder_and_mask_decoder_match_reference(model_type, seeded_pairs):
    ours, ref = seeded_pairs(model_type)
    g = torch.Generator().manual_seed(3)
    size = registry.EMBEDDING_SIZE
    low = registry.LOW_RES_MASK_SIZE
    embeddings = torch.randn(1, registry.EMBEDDING_DIM, size, size, generator=g)

    diffs = {}
    with torch.no_grad():
        pe = ours.prompt_encoder.get_dense_pe()
        diffs["dense_pe"] = _max_diff(pe, ref.prompt_encoder.get_dense_pe())
        for name, points, boxes, masks in _prompt_cases():
            sparse, dense = ours.prompt_encoder(points=points, boxes=boxes, masks=masks)
            sparse_ref, dense_ref = ref.prompt_encoder(points=points, boxes=boxes, masks=masks)
            diffs[f"{name}/sparse"] = _max_diff(sparse, sparse_ref)
            diffs[f"{name}/dense"] = _max_diff(dense, dense_ref)

            all_masks, all_iou = ours.mask_decoder.predict_masks(embeddings, pe, sparse, dense)
            all_masks_ref, all_iou_ref = ref.mask_decoder.predict_masks(embeddings, pe, sparse_ref, dense_ref)
            assert all_masks.shape == (sparse.shape[0], registry.NUM_MASK_OUTPUTS, low, low)
            diffs[f"{name}/masks"] = _max_diff(all_masks, all_masks_ref)
            diffs[f"{name}/iou"] = _max_diff(all_iou, all_iou_ref)
            if name not in ("points", "all"):
                continue
            for multimask in (True, False):
                m, iou = ours.mask_decoder(embeddings, pe, sparse, dense, multimask_output=multimask)
                m_ref, iou_ref = ref.mask_decoder(embeddings, pe, sparse_ref, dense_ref, multimask_output=multimask)
                assert m.shape == (sparse.shape[0], 3 if multimask else 1, low, low)
                diffs[f"{name}/masks/multimask={multimask}"] = _max_diff(m, m_ref)
                diffs[f"{name}/iou/multimask={multimask}"] = _max_diff(iou, iou_ref)
    worst = max(diffs, key=diffs.get)
    print(f"{model_type} prompt encoder + mask decoder max abs diff: {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] <= TOL, diffs
    # well-scaled test model
    assert 0.1 < all_masks.std().item() < 100 and all_iou.abs().max().item() < 100


def test_sam_pre_and_postprocessing_match_reference(seeded_pairs):
    ours, ref = seeded_pairs("vit_t")
    g = torch.Generator().manual_seed(4)
    image = torch.rand(3, 768, 1024, generator=g) * 255
    assert _max_diff(ours.preprocess(image), ref.preprocess(image)) == 0.0
    low_res = torch.randn(2, 3, 256, 256, generator=g)
    out = ours.postprocess_masks(low_res, (768, 1024), (300, 400))
    assert out.shape == (2, 3, 300, 400)
    assert _max_diff(out, ref.postprocess_masks(low_res, (768, 1024), (300, 400))) == 0.0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_model_type_from_state_dict(model_type):
    with torch.device("meta"):  # shapes are all it needs
        state_dict = build_sam(model_type).state_dict()
    assert model_type_from_state_dict(state_dict) == model_type


def test_model_type_from_state_dict_rejects_other_dicts():
    with torch.device("meta"):
        vit_b = build_sam("vit_b").state_dict()
    with pytest.raises(ValueError, match="Not a SAM state dict"):
        model_type_from_state_dict({})
    with pytest.raises(ValueError, match="Not a SAM state dict"):
        model_type_from_state_dict({"conv.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="model_state"):
        model_type_from_state_dict({"model_state": vit_b})
    with pytest.raises(ValueError, match="Not a SAM state dict"):
        model_type_from_state_dict(["image_encoder.x"])
    with pytest.raises(ValueError, match="Not a SAM state dict"):
        model_type_from_state_dict({k: v for k, v in vit_b.items() if not k.startswith("image_encoder.patch_embed")})
    # a ViT encoder of a size no SAM model has
    truncated = {k: v for k, v in vit_b.items() if not k.startswith("image_encoder.blocks.11.")}
    with pytest.raises(ValueError, match="unknown architecture"):
        model_type_from_state_dict(truncated)


def test_seeded_sam_is_deterministic_and_seed_dependent():
    a = seeded_sam("vit_t", seed=0).state_dict()
    b = seeded_sam("vit_t", seed=0).state_dict()
    c = seeded_sam("vit_t", seed=1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    floats = [k for k in a if a[k].is_floating_point()]
    assert all(not torch.equal(a[k], c[k]) for k in floats)
    # the parameters SAM initialises to constants are random too, so they take part in the tests above
    for key in [
        "image_encoder.layers.1.blocks.0.attn.attention_biases",
        "image_encoder.neck.1.weight",
        "image_encoder.layers.0.blocks.0.conv3.bn.weight",
        "image_encoder.layers.0.blocks.0.conv3.bn.running_var",
        "mask_decoder.transformer.norm_final_attn.bias",
    ]:
        assert a[key].std() > 0, key


def test_seeded_vit_has_random_position_parameters(seeded_pairs):
    sam, _ = seeded_pairs("vit_b")
    assert not sam.training
    encoder = sam.image_encoder
    for p in [encoder.pos_embed, encoder.blocks[0].attn.rel_pos_h, encoder.blocks[2].attn.rel_pos_w, encoder.blocks[0].norm1.bias]:
        assert 0 < p.std().item() < 0.2


@pytest.mark.parametrize("kind", ["vit", "tiny_vit"])
def test_small_encoders_trace_and_export_to_onnx(kind, tmp_path):
    """Same code paths as the real encoders (window padding, relative positions, attention biases) at a
    small size: torch.jit.trace and the TorchScript ONNX exporter must reproduce eager outputs."""
    import onnx
    import onnxruntime as ort
    from usam_bioimageio.modeling.image_encoder import ImageEncoderViT
    from usam_bioimageio.modeling.tiny_vit import TinyViT

    torch.manual_seed(0)
    if kind == "vit":  # 16 x 16 grid: windows of 14 need padding
        encoder = ImageEncoderViT(img_size=256, embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), out_chans=32)
    else:  # stages at 64, 32, 16, 16: all windowed with padding
        encoder = TinyViT(img_size=256, embed_dims=(16, 32, 40, 80), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), out_chans=32)
    with torch.no_grad():  # constants -> random, so that every parameter matters
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    encoder.eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = encoder(x)
        traced = torch.jit.trace(encoder, x, check_trace=False)
        assert _max_diff(traced(x), expected) == 0.0
        path = tmp_path / "encoder.onnx"
        torch.onnx.export(encoder, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    onnx.checker.check_model(str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert _max_diff(torch.from_numpy(got), expected) <= 1e-4
