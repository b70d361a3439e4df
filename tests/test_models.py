"""Base-model sources: a local diffusers folder, a Hub id read from the Hugging Face cache, a single-file
checkpoint (LDM layout, as downloaded from Civitai), and the errors for what cannot be loaded."""

import shutil

import pytest
import torch

from lycoflow.models import BaseModelError, Pretrained
from lycoflow.tiny import BOS, EOS, TinySD
from lycoflow.tools.convert import save_single_file


def outputs(parts):
    gen = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500])
    ids = parts.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        context = parts.text_encoder(ids)[0]
        return {
            "unet": parts.unet(latents, t, encoder_hidden_states=context).sample,
            "vae": parts.vae.decode(latents).sample,
            "text": context,
        }


def test_tiny_model_has_the_real_clip_tokenizer_and_sd_geometry(tiny_sd_folder):
    parts = Pretrained(str(tiny_sd_folder)).load()
    assert parts.tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert len(parts.tokenizer) == parts.text_encoder.config.vocab_size == 49408
    assert 2 ** (len(parts.vae.config.block_out_channels) - 1) == 8  # SD's 8x latent reduction
    assert parts.scheduler.config.beta_schedule == "scaled_linear" and parts.version == "sd_v1"


def test_tiny_sd_is_built_once_and_deterministic(tmp_path):
    first = TinySD(folder=str(tmp_path / "a"), seed=3).load()
    stamp = (tmp_path / "a" / "unet" / "config.json").stat().st_mtime_ns
    again = TinySD(folder=str(tmp_path / "a"), seed=3).load()
    other = TinySD(folder=str(tmp_path / "b"), seed=3).load()
    assert (tmp_path / "a" / "unet" / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    for a, b, c in zip(first.unet.parameters(), again.unet.parameters(), other.unet.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_hub_id_loads_from_the_hugging_face_cache_offline(tiny_sd_folder, tmp_path):
    # The layout huggingface_hub writes when it downloads a repo: refs/main → snapshots/<commit>/...
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_sd_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cached = Pretrained("someone/tiny-sd", cache_dir=str(tmp_path / "hub")).load()
    local = Pretrained(str(tiny_sd_folder)).load()
    for key, value in outputs(local).items():
        torch.testing.assert_close(outputs(cached)[key], value, atol=0, rtol=0, msg=key)


def test_single_file_checkpoint_loads_as_base_model(tiny_sd_folder, tmp_path):
    local = Pretrained(str(tiny_sd_folder)).load()
    path = save_single_file(tmp_path / "tiny.safetensors", local)
    single = Pretrained(str(path), config=str(tiny_sd_folder)).load()
    for key, value in outputs(local).items():
        torch.testing.assert_close(outputs(single)[key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert single.version == "sd_v1"


def test_pickle_checkpoint_needs_trust(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not even read")
    with pytest.raises(BaseModelError, match=r"model\.ckpt is a pickle checkpoint.*trust_pickle"):
        Pretrained(str(path)).load()


@pytest.mark.parametrize(("path", "message"), [
    ("{tmp}/missing.safetensors", r"checkpoint not found: .*missing\.safetensors"),
    ("./no/such/folder", r"base model not found: './no/such/folder'"),
    ("{tmp}", r"is not a diffusers folder \(no model_index\.json or unet/\)"),
    ("nobody/no-such-model", r"could not load base model 'nobody/no-such-model' from the Hugging Face Hub"),
])
def test_unloadable_base_model_is_named(tmp_path, path, message):
    with pytest.raises(BaseModelError, match=message):
        Pretrained(path.format(tmp=tmp_path), cache_dir=str(tmp_path / "empty-cache")).load()


def test_building_the_tiny_model_leaves_the_global_random_state_alone(tmp_path, tiny_sd_folder):
    # A run whose cache is cold builds TinySD after seeding; it must then train exactly like a run that reads the
    # model back (before: the build reseeded torch, so the adapters' initialisation differed on the first run).
    torch.manual_seed(123)
    state = torch.get_rng_state()
    built = TinySD(folder=str(tmp_path / "tiny")).load()
    assert torch.equal(torch.get_rng_state(), state)
    read = Pretrained(str(tiny_sd_folder)).load()  # the same weights as the session's build
    for key, value in outputs(built).items():
        torch.testing.assert_close(value, outputs(read)[key], rtol=0, atol=0, msg=key)
