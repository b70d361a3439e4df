"""Metric encoders: the tiny random ones (shapes, seeds, protocols), the real classes' loading and feature code
on tiny models saved locally, VGG19's conv*_1 taps against timm's own network, and the loading errors."""

import pytest
import timm
import torch
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from lycoflow.metrics.encoders import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG19,
    DINOv2,
    EncoderError,
    ImageEmbedder,
    StyleFeatures,
    TextImageEmbedder,
    TinyCLIP,
    TinyDINOv2,
    TinyVGG19,
)
from lycoflow.tiny import BOS, EOS, clip_tokenizer

CAT = 2368  # "cat</w>" in OpenAI's CLIP vocabulary
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
def vgg():
    return TinyVGG19()


def test_protocols(dino, clip, vgg):
    assert isinstance(dino, ImageEmbedder) and not isinstance(dino, TextImageEmbedder)
    assert isinstance(clip, TextImageEmbedder) and isinstance(clip, ImageEmbedder)
    assert isinstance(vgg, StyleFeatures) and not isinstance(vgg, ImageEmbedder)
    assert not isinstance(dino, StyleFeatures)
    for encoder in (dino, clip, vgg):
        assert encoder.pretrained is False and "untrained" in encoder.name


@pytest.mark.parametrize("size", SIZES)
def test_image_embeddings_have_one_float32_row_per_image(dino, clip, size):
    x = images(*size, b=3)
    for encoder, dim in ((dino, 64), (clip, 32)):
        out = encoder.embed_images(x)
        assert out.shape == (3, dim) and out.dtype == torch.float32 and out.isfinite().all()


def test_encoders_are_frozen_and_stay_in_eval_mode(dino, clip, vgg):
    x = images(64, 64).requires_grad_()
    for encoder in (dino, clip, vgg):
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


def test_seeds_give_identical_and_different_encoders(dino, clip, vgg):
    x, texts = images(64, 64), ["a photo of a cat", "a dog"]
    torch.testing.assert_close(TinyDINOv2(seed=0).embed_images(x), dino.embed_images(x), rtol=0, atol=0)
    assert not torch.allclose(TinyDINOv2(seed=1).embed_images(x), dino.embed_images(x))
    same, other = TinyCLIP(seed=0), TinyCLIP(seed=1)
    torch.testing.assert_close(same.embed_images(x), clip.embed_images(x), rtol=0, atol=0)
    torch.testing.assert_close(same.embed_texts(texts), clip.embed_texts(texts), rtol=0, atol=0)
    assert not torch.allclose(other.embed_images(x), clip.embed_images(x))
    assert not torch.allclose(other.embed_texts(texts), clip.embed_texts(texts))
    for a, b in zip(TinyVGG19(seed=0).feature_maps(x), vgg.feature_maps(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(TinyVGG19(seed=1).feature_maps(x)[0], vgg.feature_maps(x)[0])


def test_clip_texts_share_the_image_space_and_depend_on_the_text(clip):
    texts = clip.embed_texts(["a photo of a cat", "a photo of a dog", "a photo of a cat"])
    assert texts.shape == (3, clip.embed_images(images(64, 64)).shape[1]) and texts.dtype == torch.float32
    assert not torch.allclose(texts[0], texts[1])
    torch.testing.assert_close(texts[0], texts[2])


def test_clip_truncates_long_texts_to_the_context_keeping_the_end_token(clip):
    ids = torch.tensor([[BOS, *[CAT] * 75, EOS]])
    with torch.no_grad():
        expected = clip.model.text_projection(clip.model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(clip.embed_texts(["cat " * 200]), expected)


@pytest.mark.parametrize("size", SIZES)
def test_vgg_taps_are_the_first_conv_of_each_block(vgg, size):
    maps = vgg.feature_maps(images(*size))
    assert [m.shape[1] for m in maps] == [8, 16, 32, 64, 64]
    assert [tuple(m.shape[2:]) for m in maps] == [(size[0] // 2**k, size[1] // 2**k) for k in range(5)]
    assert all(m.dtype == torch.float32 for m in maps)
    assert all((m < 0).any() for m in maps)  # pre-ReLU


def test_vgg_resizes_the_shorter_side_keeping_the_aspect_ratio():
    maps = TinyVGG19(image_size=32).feature_maps(images(96, 64))
    assert tuple(maps[0].shape[2:]) == (48, 32) and tuple(maps[4].shape[2:]) == (3, 2)


def test_vgg19_taps_timms_network_before_relu_and_stops_at_conv5_1():
    torch.manual_seed(0)
    encoder = VGG19(pretrained=False)
    torch.manual_seed(0)
    reference = timm.create_model("vgg19", pretrained=False).eval()
    assert encoder.name == "vgg19 (untrained)" and encoder.pretrained is False
    assert len(encoder.features) == 29  # conv5_1 is layer 28 of timm's vgg19.features
    x = images(64, 48)
    expected, h = [], normalise(x, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        for i, layer in enumerate(reference.features[:29]):
            h = layer(h.clone())  # timm's ReLUs are in place
            if i in (0, 5, 10, 19, 28):
                expected.append(h.clone())
    maps = encoder.feature_maps(x)
    assert [m.shape[1] for m in maps] == [64, 128, 256, 512, 512]
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)


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
