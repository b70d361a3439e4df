"""Captions up to 150/225 tokens (kohya's ``max_token_length``): the chunks' token ids, their hidden states, and
that training, sampling and ``lycoflow generate`` read them; with 75 the encoding is the plain 77-token one."""

import argparse
import json
from dataclasses import replace

import pytest
import torch
from transformers import CLIPTokenizer

import lycoris
from lycoflow.evaluation.sampling import Sampler, sample
from lycoflow.models import Components, Pretrained
from lycoflow.module import DiffusionFinetune
from lycoflow.tiny import BOS, EOS, TinySD
from lycoflow.tools import main_generate

PHOTO, CAT = 1125, 2368  # "photo", "cat" in CLIP's vocabulary: one token each


def words(n_photo: int, n_cat: int = 0) -> str:
    return " ".join(["photo"] * n_photo + ["cat"] * n_cat)


@pytest.fixture(scope="module")
def parts(tiny_sd_folder) -> Components:
    return Pretrained(str(tiny_sd_folder)).load()


def sd2_tokenizer(tiny_sd_folder) -> CLIPTokenizer:
    """The tiny model's tokenizer padding with "!" (id 0) instead of EOS, as SD 2.x's does."""
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_folder / "tokenizer"), pad_token="!")
    assert tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    return tokenizer


# kohya sd-scripts, transcribed: library/train_util.py, BaseDataset.get_input_ids (tokenizer_max_length =
# max_token_length + 2) and get_hidden_states (clip_skip None); `v2` is whether the padding differs from EOS.
def kohya_input_ids(caption, tokenizer, max_token_length):
    tokenizer_max_length = max_token_length + 2
    input_ids = tokenizer(caption, padding="max_length", truncation=True, max_length=tokenizer_max_length,
                          return_tensors="pt").input_ids
    input_ids = input_ids.squeeze(0)
    iids_list = []
    for i in range(1, tokenizer_max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
        ids_chunk = torch.cat((input_ids[0].unsqueeze(0), input_ids[i:i + tokenizer.model_max_length - 2],
                               input_ids[-1].unsqueeze(0)))
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                ids_chunk[-1] = tokenizer.eos_token_id
            if ids_chunk[1] == tokenizer.pad_token_id:
                ids_chunk[1] = tokenizer.eos_token_id
        iids_list.append(ids_chunk)
    return torch.stack(iids_list)


@torch.no_grad()
def kohya_hidden_states(input_ids, tokenizer, text_encoder, max_token_length):
    b_size = input_ids.size()[0]
    input_ids = input_ids.reshape((-1, tokenizer.model_max_length))
    encoder_hidden_states = text_encoder(input_ids)[0]
    encoder_hidden_states = encoder_hidden_states.reshape((b_size, -1, encoder_hidden_states.shape[-1]))
    v2 = tokenizer.pad_token_id != tokenizer.eos_token_id
    states_list = [encoder_hidden_states[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, tokenizer.model_max_length):
        chunk = encoder_hidden_states[:, i:i + tokenizer.model_max_length - 2]
        if v2 and i > 0:
            for j in range(len(chunk)):
                if input_ids[j, 1] == tokenizer.eos_token:  # ids against the token's text: never true
                    chunk[j, 0] = chunk[j, 1]
        states_list.append(chunk)
    states_list.append(encoder_hidden_states[:, -1].unsqueeze(1))
    return torch.cat(states_list, dim=1)


def test_a_150_token_caption_is_two_chunks_of_75_framed_by_bos_and_eos(parts):
    ids = replace(parts, max_token_length=150).tokenize([words(75, 75), words(100)])
    assert ids.shape == (2, 2, 77)
    assert ids[0, 0].tolist() == [BOS] + [PHOTO] * 75 + [EOS]
    assert ids[0, 1].tolist() == [BOS] + [CAT] * 75 + [EOS]
    # 100 tokens: the second chunk holds the last 25, then the end token and the padding (EOS for SD 1.x).
    assert ids[1, 0].tolist() == [BOS] + [PHOTO] * 75 + [EOS]
    assert ids[1, 1].tolist() == [BOS] + [PHOTO] * 25 + [EOS] * 51
    # Longer than 150: cut after 150 tokens, the end token kept.
    assert replace(parts, max_token_length=150).tokenize([words(75, 80)]).equal(ids[:1])
    three = replace(parts, max_token_length=225).tokenize([words(75, 80)])
    assert three.shape == (1, 3, 77) and three[0, 2].tolist() == [BOS] + [CAT] * 5 + [EOS] * 71


def test_each_chunk_is_encoded_alone_and_the_states_joined_as_kohya_does(parts):
    long = replace(parts, max_token_length=150)
    states = long.encode_text([words(75, 75)])
    assert states.shape == (1, 152, parts.text_encoder.config.hidden_size)
    ids = long.tokenize([words(75, 75)])
    with torch.no_grad():
        first, second = (parts.text_encoder(ids[:, k])[0] for k in range(2))
    # The first chunk's BOS and 75 token states, the second's 75 token states and its last state; the inner
    # EOS and BOS states are left out.
    torch.testing.assert_close(states[:, :76], first[:, :76])
    torch.testing.assert_close(states[:, 76:151], second[:, 1:76])
    torch.testing.assert_close(states[:, 151:], second[:, 76:])


@pytest.mark.parametrize("padding", ["eos", "sd2"])
@pytest.mark.parametrize("max_token_length", [150, 225])
def test_ids_and_states_are_kohyas_for_short_long_and_overlong_captions(parts, tiny_sd_folder, padding,
                                                                       max_token_length):
    tokenizer = parts.tokenizer if padding == "eos" else sd2_tokenizer(tiny_sd_folder)
    long = replace(parts, tokenizer=tokenizer, max_token_length=max_token_length)
    captions = ["", "zqx star, red", words(74), words(75), words(76), words(100, 50), words(150), words(200, 30)]
    ids = long.tokenize(captions)
    expected = torch.stack([kohya_input_ids(c, tokenizer, max_token_length) for c in captions])
    assert ids.equal(expected)
    with torch.no_grad():
        states = long.encode_text(captions)
    torch.testing.assert_close(states, kohya_hidden_states(expected, tokenizer, parts.text_encoder, max_token_length))


def test_short_captions_get_padding_chunks(parts):
    long = replace(parts, max_token_length=150)
    ids = long.tokenize(["zqx star, red"])
    plain = parts.tokenizer(["zqx star, red"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[:, 0].equal(plain) and ids[0, 1].tolist() == [BOS] + [EOS] * 76
    with torch.no_grad():
        states, padding = long.encode_text(["zqx star, red"]), parts.text_encoder(ids[:, 1])[0]
    torch.testing.assert_close(states[:, :76], parts.encode_text(["zqx star, red"])[:, :76])
    torch.testing.assert_close(states[:, 76:], padding[:, 1:])


def test_75_tokens_is_the_plain_encoding_bit_for_bit(parts):
    captions = ["zqx star, red", words(80), ""]
    ids = parts.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert parts.max_token_length == 75 and parts.tokenize(captions).equal(ids.input_ids[:, None])
    with torch.no_grad():
        assert parts.encode_text(captions).equal(parts.text_encoder(ids.input_ids)[0])


def test_other_lengths_are_refused(parts):
    with pytest.raises(ValueError, match="max_token_length=100 must be 75, 150 or 225"):
        replace(parts, max_token_length=100)


def test_training_and_sampling_read_the_modules_length(tiny_sd_folder):
    model = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4, preset="attn-mlp"),
                              max_token_length=150, train_text_encoder=False)
    assert model.components.max_token_length == 150
    assert model.text_conditioning(["zqx star, red"])["encoder_hidden_states"].shape[1] == 152
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "caption": ["zqx star, red", words(120)]}
    assert torch.isfinite(model.denoising_loss(batch, model._generator(0, 0)))
    # The text-encoder cache's key: another length, other entries.
    plain = DiffusionFinetune(TinySD(folder=str(tiny_sd_folder)), lycoris.LoRA(dim=4, preset="attn-mlp"),
                              train_text_encoder=False)
    assert plain.text_identity() != model.text_identity()
    # Evaluation sampling encodes its prompts (and the empty negative prompt) through the components.
    images = sample(model.components, [words(120)], [0], Sampler(steps=1, resolution=32))
    assert images.shape == (1, 3, 32, 32)


def test_generate_takes_max_token_length(tiny_sd_folder, tmp_path):
    common = ["--base", str(tiny_sd_folder), "--prompt", words(70, 30), "--steps", "1", "--resolution", "32",
              "--device", "cpu"]
    assert main_generate([*common, "--out", str(tmp_path / "75")]) == 0
    assert main_generate([*common, "--max-token-length", "150", "--out", str(tmp_path / "150")]) == 0
    index = json.loads((tmp_path / "150" / "prompts.json").read_text())
    assert index["max_token_length"] == 150
    assert (tmp_path / "75" / "0-0-0.png").read_bytes() != (tmp_path / "150" / "0-0-0.png").read_bytes()
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 100"):
        main_generate([*common, "--max-token-length", "100", "--out", str(tmp_path / "100")])
