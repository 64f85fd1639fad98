"""OpenCLIP backbones (BioCLIP, BioCLIP 2): open_clip's weights files read into timm's ViT, strictly, giving open_clip's
own patch tokens; the offline message; training, attention extraction and the image-tree route on BioCLIP.

The files are randomly initialised open_clip models saved as open_clip saves them: BioCLIP's architecture
(open_clip's ViT-B-16-quickgelu image tower, at 224 px like the released file) and, for BioCLIP 2's activation
(standard GELU) at a fraction of ViT-L/14's cost, a TinyCLIP-sized image tower (width 256, 10 blocks, 4 heads), which
timm holds as `vit_xsmall_patch16_clip_224` (any OpenCLIP ViT file loads under its timm name). The text towers are
tiny: taxotrait leaves them out.
"""

import h5py
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers.activations import QuickGELU

from taxotrait.attention_store import AttentionFile
from taxotrait.backbone import (
    OPEN_CLIP_BACKBONES, BackboneWeightsError, create_backbone, data_normalisation, weights_digest,
)
from taxotrait.checkpoint import read_checkpoint
from taxotrait.extract import extract_attention
from taxotrait.model import PromptCAM, PromptConfig
from taxotrait.token_cache import TokenCache, TokenDataset, build_token_cache
from taxotrait.train import TrainConfig, train
from test_data import CLASSES, EVAL, write_images
from test_hardening import no_network  # noqa: F401 (fixture)
from test_routes import RANKS
from test_workflow import snakemake

TEXT_TOWER = {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 2, "layers": 1}
# backbone.name -> (open_clip image tower, QuickGELU, image size of the saved file)
TOWERS = {
    "bioclip": (open_clip.get_model_config("ViT-B-16-quickgelu")["vision_cfg"], True, 224),
    "vit_xsmall_patch16_clip_224": ({"layers": 10, "width": 256, "patch_size": 16}, False, 32),
}
CLIP_MEAN_STD = (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))


def open_clip_model(name: str) -> open_clip.CLIP:
    """A randomly initialised open_clip CLIP model with the image tower of `TOWERS[name]`, its LayerNorms moved off
    the identity (so that each must be read into the right place)."""
    vision, quick_gelu, size = TOWERS[name]
    torch.manual_seed(0)
    model = open_clip.CLIP(64, {**vision, "image_size": size}, TEXT_TOWER, quick_gelu=quick_gelu)
    with torch.no_grad():
        for key, parameter in model.visual.named_parameters():
            if "ln_" in key:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: (open_clip model, {".bin": file, ".safetensors": file})}, saved as open_clip saves them."""
    folder, saved = tmp_path_factory.mktemp("open_clip"), {}
    for name in TOWERS:
        model = open_clip_model(name)
        state = model.state_dict()
        torch.save(state, folder / f"{name}.bin")
        save_file({key: value.contiguous() for key, value in state.items()}, folder / f"{name}.safetensors")
        saved[name] = model, {suffix: folder / f"{name}{suffix}" for suffix in (".bin", ".safetensors")}
    return saved


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@pytest.mark.parametrize("name", TOWERS)
def test_open_clip_files_give_open_clips_patch_tokens(files, name, suffix):
    model, paths = files[name]
    size = TOWERS[name][2]
    vit = create_backbone(name, paths[suffix], size)
    model.visual.output_tokens = True
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        _, expected = model.visual(images)
        tokens = vit.forward_features(images)[:, vit.num_prefix_tokens:]
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=0)
    assert isinstance(vit.blocks[0].mlp.act, QuickGELU) == TOWERS[name][1]
    assert data_normalisation(vit) == CLIP_MEAN_STD  # open_clip's preprocessing


def test_bioclip_2_is_a_vit_l14_with_gelu():
    assert OPEN_CLIP_BACKBONES["bioclip-2"].hub_id == "imageomics/bioclip-2"
    with torch.device("meta"):  # the architecture alone: ViT-L/14 is slow to initialise
        vit = create_backbone("bioclip-2", "random", 224)
    assert (vit.patch_embed.patch_size, vit.embed_dim, len(vit.blocks)) == ((14, 14), 1024, 24)
    assert type(vit.blocks[0].mlp.act) is torch.nn.GELU and data_normalisation(vit) == CLIP_MEAN_STD


def test_the_image_tower_is_read_strictly(files, tmp_path):
    name = "vit_xsmall_patch16_clip_224"
    state = files[name][0].state_dict()
    missing = {key: value for key, value in state.items() if key != "visual.ln_pre.weight"}
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(BackboneWeightsError, match=r"missing.bin does not fit backbone .*missing \['norm_pre\.weight'\]"):
        create_backbone(name, tmp_path / "missing.bin", 32)
    torch.save({**state, "visual.extra_proj": torch.zeros(3)}, tmp_path / "unexpected.bin")
    with pytest.raises(BackboneWeightsError, match=r"unexpected.bin does not fit .*unexpected \['extra_proj'\]"):
        create_backbone(name, tmp_path / "unexpected.bin", 32)
    # open_clip's projection (visual.proj) and text tower are left out, not missed
    vit = create_backbone(name, files[name][1][".bin"], 32)
    assert not any(key.startswith("head") for key in vit.state_dict()) and vit.num_classes == 0


@pytest.mark.parametrize("name", OPEN_CLIP_BACKBONES)
def test_offline_the_message_names_the_file_and_the_config_line(no_network, monkeypatch, name):  # noqa: F811
    import huggingface_hub.constants as hub

    file = f"https://huggingface.co/imageomics/{name}/resolve/main/open_clip_pytorch_model.bin"
    line = f"`backbone: {{name: {name}, weights: path/to/open_clip_pytorch_model.bin}}`"
    with pytest.raises(BackboneWeightsError) as unreachable:
        create_backbone(name)
    assert "huggingface.co is not reachable" in str(unreachable.value)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneWeightsError) as offline:
        create_backbone(name)
    for message in (str(unreachable.value), str(offline.value)):
        assert f"download {file} on a connected machine" in message and line in message
        assert "timm.create_model" not in message
    assert len(no_network) == 1  # offline: not even a probe


def test_bioclip_weights_null_come_from_the_hub_cache_or_are_downloaded(files, no_network, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    model, local = files["bioclip"]
    downloads = []

    def download(repo, file):
        downloads.append((repo, file))
        if file == "open_clip_pytorch_model.bin":
            raise EntryNotFoundError(f"{repo} has no {file}")
        return str(local[".safetensors"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr("taxotrait.backbone.reachable", lambda url: True)
    downloaded = create_backbone("bioclip", None, 32)
    qkv = model.visual.transformer.resblocks[5].attn.in_proj_weight
    assert torch.equal(downloaded.blocks[5].attn.qkv.weight, qkv)
    assert downloads == [("imageomics/bioclip", "open_clip_pytorch_model.bin"),
                         ("imageomics/bioclip", "open_clip_model.safetensors")]
    snapshot = tmp_path / "hub" / "models--imageomics--bioclip" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_pytorch_model.bin").symlink_to(local[".bin"])
    cached = create_backbone("bioclip", None, 32)
    assert weights_digest(cached) == weights_digest(downloaded) and len(downloads) == 2  # read from the cache


def test_promptcam_trains_and_extracts_attention_on_bioclip(files, tmp_path):
    """At 32 px (the 224 px file's position embeddings resampled to a 2x2 grid): a token cache, one epoch of
    training (the prompts and head move, the backbone does not), and attention.h5."""
    vit = create_backbone("bioclip", files["bioclip"][1][".safetensors"], 32)
    before = weights_digest(vit)
    torch.manual_seed(1)
    model = PromptCAM(vit, CLASSES, PromptConfig("scalable", 1, 2), backbone_name="bioclip")
    assert model.normalisation == CLIP_MEAN_STD
    paths, labels = write_images(tmp_path, per_class=2)
    cache = TokenCache.open(build_token_cache(model, paths, tmp_path / "tokens.npy", augment=EVAL, progress=False,
                                              precision="fp32"))
    initial = {key: value.clone() for key, value in model.trainable_state_dict().items()}
    history = train(model, TokenDataset(cache, labels), None, TrainConfig(epochs=1, batch_size=4, device="cpu"),
                    progress=False)
    assert np.isfinite(history["loss"]).all() and weights_digest(model.backbone) == before
    assert all(not torch.equal(value, initial[key]) for key, value in model.trainable_state_dict().items()
               if value.numel())
    ids = [path.stem for path in paths]
    batches = [(ids, torch.tensor(cache.tokens[:, 0], dtype=torch.float32), torch.tensor(labels))]
    extract_attention(model.eval(), batches, len(ids), tmp_path / "attention.h5", "species", progress=False)
    with AttentionFile(tmp_path / "attention.h5") as stored, h5py.File(tmp_path / "attention.h5") as h5:
        assert stored.grid == (2, 2) and stored.heads == 12 and list(stored.labels) == labels
        assert h5["attention"].shape == (len(ids), 2, 12, 2, 2) and h5.attrs["backbone"] == "bioclip"
        assert np.isfinite(h5["attention"][:]).all()


@pytest.mark.slow
def test_the_image_tree_route_runs_on_bioclip(files, tmp_path):
    """`.test/image_tree` with `backbone: {name: bioclip, weights: <open_clip file>}` at 64 px, through the trait
    tables and the key; the models and attention maps record BioCLIP's name, weights digest and normalisation."""
    weights = files["bioclip"][1][".bin"]
    settings = tmp_path / "bioclip.yaml"
    settings.write_text(f"backbone: {{name: bioclip, weights: {weights}, img_size: 64}}\n")
    out = tmp_path / "results"
    run = out / "test_image_tree"
    snakemake(str(run / "key.md"), "--configfile", ".test/image_tree/config.yaml", str(settings),
              "--config", f"results={out}")
    digest = weights_digest(create_backbone("bioclip", weights, 64, antialias=False))  # backbone.antialias: false
    # the key's forks (a few images per species: whether an entry's interval clears 0 is not asked here)
    assert "## (root) → " in (run / "key.md").read_text()
    assert list(pd.read_parquet(run / "key.parquet").columns[:3]) == ["node_rank", "node", "n_children"]
    for rank in RANKS:
        assert not pd.read_parquet(run / rank / "traits.parquet").empty
        checkpoint = read_checkpoint(run / rank / "model.pt")
        assert checkpoint["config"]["backbone"] == "bioclip" and checkpoint["backbone_digest"] == digest
        assert tuple(map(tuple, checkpoint["config"]["normalisation"])) == CLIP_MEAN_STD
        with h5py.File(run / rank / "attention.h5") as h5:
            assert h5.attrs["backbone_digest"] == digest and list(h5.attrs["grid"]) == [4, 4]
