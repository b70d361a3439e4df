"""Metric encoders: the tiny random ones (shapes, seeds, protocols), the real classes' loading and feature code
on tiny models saved locally, open_clip's tokenizer and eval transform, VGG19's taps against torchvision's own
network as the paper's code ran it, and the loading errors."""

import inspect
import json
import re

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
import torchvision
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.functional import pil_to_tensor
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from lycoflow.metrics.encoders import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_OPEN_CLIP_CONFIG,
    VGG19,
    DINOv2,
    EncoderError,
    ImageEmbedder,
    OpenCLIP,
    StyleFeatures,
    TextImageEmbedder,
    TinyCLIP,
    TinyDINOv2,
    TinyOpenCLIP,
    TinyVGG19,
)
from lycoflow.tiny import BOS, EOS, clip_tokenizer

CAT = 2368  # "cat</w>" in OpenAI's CLIP vocabulary
PAPER_CLIP = ("ViT-L-14", "datacomp_xl_s13b_b90k")
SIZES = [(64, 64), (96, 64)]


def images(h: int, w: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def dino():
    return TinyDINOv2()


@pytest.fixture(scope="module")
def clip():
    return TinyCLIP()


@pytest.fixture(scope="module")
def oclip():
    return TinyOpenCLIP()


@pytest.fixture(scope="module")
def vgg():
    return TinyVGG19()


def test_protocols(dino, clip, oclip, vgg):
    assert isinstance(dino, ImageEmbedder) and not isinstance(dino, TextImageEmbedder)
    for encoder in (clip, oclip):
        assert isinstance(encoder, TextImageEmbedder) and isinstance(encoder, ImageEmbedder)
    assert isinstance(vgg, StyleFeatures) and not isinstance(vgg, ImageEmbedder)
    assert not isinstance(dino, StyleFeatures)
    for encoder in (dino, clip, oclip, vgg):
        assert encoder.pretrained is False and "untrained" in encoder.name


@pytest.mark.parametrize("size", SIZES)
def test_image_embeddings_have_one_float32_row_per_image(dino, clip, oclip, size):
    x = images(*size, b=3)
    for encoder, dim in ((dino, 64), (clip, 32), (oclip, 32)):
        out = encoder.embed_images(x)
        assert out.shape == (3, dim) and out.dtype == torch.float32 and out.isfinite().all()


def test_encoders_are_frozen_and_stay_in_eval_mode(dino, clip, oclip, vgg):
    x = images(64, 64).requires_grad_()
    for encoder in (dino, clip, oclip, vgg):
        encoder.train()
        assert not encoder.training and not any(m.training for m in encoder.modules())
        assert not any(p.requires_grad for p in encoder.parameters())
    assert not dino.embed_images(x).requires_grad
    assert not any(m.requires_grad for m in vgg.feature_maps(x))


def test_images_go_to_the_models_dtype(dino):
    x = images(64, 64)
    double = TinyDINOv2().to(torch.float64).embed_images(x)
    assert double.dtype == torch.float32
    torch.testing.assert_close(double, dino.embed_images(x), rtol=1e-4, atol=1e-5)


def test_seeds_give_identical_and_different_encoders(dino, clip, oclip, vgg):
    x, texts = images(64, 64), ["a photo of a cat", "a dog"]
    torch.testing.assert_close(TinyDINOv2(seed=0).embed_images(x), dino.embed_images(x), rtol=0, atol=0)
    assert not torch.allclose(TinyDINOv2(seed=1).embed_images(x), dino.embed_images(x))
    for cls, encoder in ((TinyCLIP, clip), (TinyOpenCLIP, oclip)):
        same, other = cls(seed=0), cls(seed=1)
        torch.testing.assert_close(same.embed_images(x), encoder.embed_images(x), rtol=0, atol=0)
        torch.testing.assert_close(same.embed_texts(texts), encoder.embed_texts(texts), rtol=0, atol=0)
        assert not torch.allclose(other.embed_images(x), encoder.embed_images(x))
        assert not torch.allclose(other.embed_texts(texts), encoder.embed_texts(texts))
    for a, b in zip(TinyVGG19(seed=0).feature_maps(x), vgg.feature_maps(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(TinyVGG19(seed=1).feature_maps(x)[0], vgg.feature_maps(x)[0])


def test_clip_texts_share_the_image_space_and_depend_on_the_text(clip, oclip):
    for encoder in (clip, oclip):
        texts = encoder.embed_texts(["a photo of a cat", "a photo of a dog", "a photo of a cat"])
        assert texts.shape == (3, encoder.embed_images(images(64, 64)).shape[1]) and texts.dtype == torch.float32
        assert not torch.allclose(texts[0], texts[1])
        torch.testing.assert_close(texts[0], texts[2])


def test_clip_truncates_long_texts_to_the_context_keeping_the_end_token(clip):
    ids = torch.tensor([[BOS, *[CAT] * 75, EOS]])
    with torch.no_grad():
        expected = clip.model.text_projection(clip.model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(clip.embed_texts(["cat " * 200]), expected)


@pytest.mark.parametrize("size", SIZES)
def test_vgg_taps_are_at_the_first_conv_of_each_block_after_relu_but_the_last(size):
    x = images(*size)
    paper = TinyVGG19(image_size=None).feature_maps(x)
    pre = TinyVGG19(image_size=None, taps="pre-relu").feature_maps(x)
    for maps in (paper, pre):
        assert [m.shape[1] for m in maps] == [8, 16, 32, 64, 64]
        assert [tuple(m.shape[2:]) for m in maps] == [(size[0] // 2**k, size[1] // 2**k) for k in range(5)]
        assert all(m.dtype == torch.float32 for m in maps)
    assert all((m < 0).any() for m in pre)
    for k in range(4):
        torch.testing.assert_close(paper[k], pre[k].relu(), rtol=0, atol=0)
    torch.testing.assert_close(paper[4], pre[4], rtol=0, atol=0)
    assert (paper[4] < 0).any()


def test_vgg_resizes_the_shorter_side_to_224_by_default_keeping_the_aspect_ratio():
    x = images(300, 450, b=1)
    defaults = inspect.signature(VGG19).parameters  # building the real one takes seconds
    assert defaults["image_size"].default == 224 and defaults["taps"].default == "paper"
    maps = TinyVGG19().feature_maps(x)
    assert [tuple(m.shape[2:]) for m in maps] == [(224, 336), (112, 168), (56, 84), (28, 42), (14, 21)]
    maps = TinyVGG19(image_size=None).feature_maps(x)
    assert [tuple(m.shape[2:]) for m in maps] == [(300, 450), (150, 225), (75, 112), (37, 56), (18, 28)]
    maps = TinyVGG19(image_size=32).feature_maps(images(96, 64))
    assert tuple(maps[0].shape[2:]) == (48, 32) and tuple(maps[4].shape[2:]) == (3, 2)


def test_vgg19_taps_torchvisions_network_as_the_paper_ran_it():
    torch.manual_seed(0)
    reference = torchvision.models.vgg19(weights=None).eval()
    encoder = VGG19(pretrained=False, image_size=None)
    pre_relu = VGG19(pretrained=False, image_size=None, taps="pre-relu")
    assert encoder.name == "vgg19 (untrained)" and encoder.pretrained is False
    assert len(encoder.features) == 29  # conv5_1 is layer 28 of torchvision's (and timm's) vgg19.features
    for model in (encoder, pre_relu):
        model.features.load_state_dict(reference.features[:29].state_dict())
    x = images(64, 48)
    with torch.no_grad():
        # The paper's code: keep conv1_1…conv5_1's outputs while torchvision's in-place ReLUs run after them.
        stored, h = [], normalise(x, IMAGENET_MEAN, IMAGENET_STD)
        for i, layer in enumerate(reference.features[:29]):
            h = layer(h)
            if i in (0, 5, 10, 19, 28):
                stored.append(h)
        outputs, h = [], normalise(x, IMAGENET_MEAN, IMAGENET_STD)
        for layer in reference.features[:29]:
            h = layer(h.clone())
            outputs.append(h)
    paper, pre = encoder.feature_maps(x), pre_relu.feature_maps(x)
    assert [m.shape[1] for m in paper] == [64, 128, 256, 512, 512]
    # After relu1_1, relu2_1, relu3_1, relu4_1 (layers 1, 6, 11, 20); before the ReLU at conv5_1 (layer 28).
    for got, want, kept in zip(paper, [outputs[i] for i in (1, 6, 11, 20, 28)], stored):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(got, kept, rtol=0, atol=1e-6)
    for got, want in zip(pre, [outputs[i] for i in (0, 5, 10, 19, 28)]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="taps"):
        TinyVGG19(taps="post-relu")


def test_vgg19_weights_errors(tmp_path):
    with pytest.raises(EncoderError, match="missing.safetensors"):
        VGG19(weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="pretrained"):
        VGG19(pretrained=False, weights=str(tmp_path / "missing.safetensors"))


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    torch.manual_seed(1)
    model = Dinov2Model(Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
    )).eval()
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder)
    return folder, model


def test_dinov2_loads_a_folder_and_embeds_the_normed_cls_token(dinov2_folder):
    folder, model = dinov2_folder
    encoder = DINOv2(model=str(folder), image_size=56)
    assert encoder.name == f"dinov2:{folder}" and encoder.pretrained is True
    x = images(84, 56)  # the centre 56×56 crop, rows 14…69, with no resizing
    with torch.no_grad():
        expected = model(pixel_values=normalise(x[:, :, 14:70], IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
    torch.testing.assert_close(encoder.embed_images(x), expected)
    # Resizing: a uniform image stays uniform at any size.
    grey = torch.full((1, 3, 112, 168), 0.3)
    torch.testing.assert_close(encoder.embed_images(grey), encoder.embed_images(grey[:, :, :56, :56]))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("vocab"))
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(1)
    model = CLIPModel(CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "bos_token_id": BOS, "eos_token_id": EOS,
                     "pad_token_id": EOS},
        vision_config={**tower, "image_size": 48, "patch_size": 16},
        projection_dim=24,
    )).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_clip_loads_a_folder_and_embeds_projected_images_and_texts(clip_folder):
    folder, model = clip_folder
    encoder = CLIP(model=str(folder))
    assert encoder.name == f"clip:{folder}" and encoder.pretrained is True
    x = images(48, 48)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=normalise(x, CLIP_MEAN, CLIP_STD)).pooler_output
        expected_images = model.visual_projection(pooled)
        expected_texts = torch.cat([
            model.text_projection(model.text_model(input_ids=torch.tensor([ids])).pooler_output)
            for ids in ([BOS, 320, 1125, 539, 320, CAT, EOS], [BOS, CAT, EOS])
        ])
    torch.testing.assert_close(encoder.embed_images(x), expected_images)
    # The shorter text is padded in the batch; the attention mask and end-token pooling make that invisible.
    torch.testing.assert_close(encoder.embed_texts(["a photo of a cat", "cat"]), expected_texts)
    assert encoder.embed_images(images(96, 64)).shape == (2, 24)


def test_missing_models_give_errors_that_name_them_and_the_fix(dinov2_folder, clip_folder, tmp_path):
    for cls in (DINOv2, CLIP):
        with pytest.raises(EncoderError, match=r"'lycoflow-tests/no-such-model'.*Download it once"):
            cls(model="lycoflow-tests/no-such-model")
        with pytest.raises(EncoderError, match="neither an existing folder nor a Hub id"):
            cls(model=str(tmp_path / "no-such-folder"))
    with pytest.raises(EncoderError, match="not a DINOv2"):
        DINOv2(model=str(clip_folder[0]))
    with pytest.raises(EncoderError, match="could not load CLIP model"):
        CLIP(model=str(dinov2_folder[0]))  # a folder without a CLIP model or tokenizer


def test_open_clip_embeds_with_encode_image_and_encode_text(oclip):
    x = images(224, 224)  # already the input size: no resizing or cropping
    with torch.no_grad():
        expected_images = oclip.model.encode_image(normalise(x, CLIP_MEAN, CLIP_STD))
        expected_texts = oclip.model.encode_text(open_clip.tokenize(["a photo of a cat", "cat"]))
    torch.testing.assert_close(oclip.embed_images(x), expected_images)
    torch.testing.assert_close(oclip.embed_texts(["a photo of a cat", "cat"]), expected_texts)
    assert oclip.embed_images(images(96, 64)).shape == (2, TINY_OPEN_CLIP_CONFIG["embed_dim"])


def test_open_clip_tokenizes_with_open_clips_tokenizer_and_truncates_keeping_the_end_token(oclip):
    assert oclip.tokenizer(["a photo of a cat"])[0, :8].tolist() == [BOS, 320, 1125, 539, 320, CAT, EOS, 0]
    ids = torch.tensor([[BOS, *[CAT] * 75, EOS]])
    with torch.no_grad():
        expected = oclip.model.encode_text(ids)
    torch.testing.assert_close(oclip.embed_texts(["cat " * 200]), expected)


def paper_clip_preprocess_cfg() -> dict:
    """The eval transform's config `open_clip.create_model` gives the paper's model: the tag's over the defaults."""
    return merge_preprocess_dict(PreprocessCfg(), open_clip.get_pretrained_cfg(*PAPER_CLIP))


def save_tiny_open_clip(folder, seed: int):
    """A `TinyOpenCLIP`'s weights and an ``open_clip_config.json`` with the paper's model's preprocessing, laid out
    as the paper's Hub repo."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny = TinyOpenCLIP(seed=seed)
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, folder / "open_clip_model.safetensors")
    preprocess = {k: paper_clip_preprocess_cfg()[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": preprocess})
    )
    return tiny


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open-clip")
    return folder, save_tiny_open_clip(folder, seed=1)


def test_open_clip_loads_a_local_folder_and_a_local_weights_file(open_clip_folder, tmp_path):
    folder, tiny = open_clip_folder
    x, texts = images(96, 64), ["a photo of a cat", "cat " * 200]
    from_folder = OpenCLIP(pretrained=str(folder))
    assert from_folder.name == f"open_clip:{folder}" and from_folder.pretrained is True
    # A weights file needs its architecture registered with open_clip (ViT-L-14 is built in).
    (tmp_path / "lycoflow-tiny-open-clip.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(tmp_path / "lycoflow-tiny-open-clip.json")
    weights = str(folder / "open_clip_model.safetensors")
    from_file = OpenCLIP(model="lycoflow-tiny-open-clip", pretrained=weights)
    assert from_file.name == f"open_clip:lycoflow-tiny-open-clip:{weights}"
    for encoder in (from_folder, from_file):
        torch.testing.assert_close(encoder.embed_images(x), tiny.embed_images(x), rtol=0, atol=0)
        torch.testing.assert_close(encoder.embed_texts(texts), tiny.embed_texts(texts), rtol=0, atol=0)


def test_open_clip_preprocesses_as_open_clips_own_transform_of_a_pil_image(open_clip_folder):
    folder, _ = open_clip_folder
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    # The paper's model's eval transform: OpenAI CLIP's mean and std, bicubic resize of the shorter side to 224.
    paper_preprocess = image_transform_v2(PreprocessCfg(**paper_clip_preprocess_cfg()), is_train=False)
    encoder = OpenCLIP(pretrained=str(folder))
    # A smooth 300×450 photo-like image (upsampled noise): shorter side 224, centre crop of columns 56…279.
    rng = np.random.default_rng(0)
    pil = Image.fromarray((rng.random((30, 45, 3)) * 255).astype(np.uint8)).resize((450, 300), Image.BICUBIC)
    seen = []
    hook = encoder.model.visual.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        embedding = encoder.embed_images(pil_to_tensor(pil)[None].float() / 255)
    finally:
        hook.remove()
    expected = preprocess(pil)[None]
    torch.testing.assert_close(expected, paper_preprocess(pil)[None], rtol=0, atol=0)
    # PIL resizes 8-bit pixels and rounds them (about 1/255, i.e. 0.015 after the std), torch resizes floats.
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0.03)
    assert (seen[0] - expected).abs().mean() < 0.005
    with torch.no_grad():
        torch.testing.assert_close(embedding, encoder.model.encode_image(expected), rtol=0, atol=0.01)


def test_missing_open_clip_weights_give_errors_that_name_them_and_the_fix(open_clip_folder, tmp_path, monkeypatch):
    # The paper's model, offline, with an empty Hugging Face cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderError, match=r"'datacomp_xl_s13b_b90k' \(Hub repo laion/CLIP-ViT-L-14-DataComp"
                                           r"\.XL-s13B-b90K\).*Download them once.*or pass `pretrained`"):
        OpenCLIP()
    with pytest.raises(EncoderError, match="'.*missing.safetensors' is neither a pretrained tag of ViT-L-14"):
        OpenCLIP(pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(EncoderError, match="no architecture 'ViT-Q-99'"):
        OpenCLIP(model="ViT-Q-99")
    empty, no_weights = tmp_path / "empty", tmp_path / "no-weights"
    empty.mkdir()
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text((open_clip_folder[0] / "open_clip_config.json").read_text())
    for folder in (empty, no_weights):
        message = rf"could not load open_clip weights '{re.escape(str(folder))}'.*Download them once"
        with pytest.raises(EncoderError, match=message):
            OpenCLIP(pretrained=str(folder))
