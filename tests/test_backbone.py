"""Backbones by timm name, local weight files, and the offline error."""

import pytest
import torch
from safetensors.torch import save_file

from taxotrait.backbone import BackboneWeightsError, create_backbone, weights_digest
from taxotrait.model import PromptCAM, PromptConfig


@pytest.mark.parametrize("name,prefix,grid", [
    ("vit_small_patch16_224.dino", 1, 14),
    ("vit_small_patch14_reg4_dinov2.lvd142m", 5, 16),
])
def test_timm_names_with_prefix_tokens(name, prefix, grid):
    vit = create_backbone(name, "random", 224)
    assert vit.num_prefix_tokens == prefix and vit.patch_embed.grid_size == (grid, grid)
    assert not any(p.requires_grad for p in vit.parameters()) and not vit.training
    model = PromptCAM(vit, ["a", "b", "c"], PromptConfig("scalable", 2))
    images = torch.randn(1, 3, 224, 224)
    assert model.class_attention(images, torch.tensor([0, 2])).shape == (1, 2, 6, grid, grid)
    assert model.class_attention(images, torch.tensor([0]), raw=True).shape[-1] == prefix + grid * grid


def test_local_weights_files_resample_position_embeddings(tmp_path):
    source = create_backbone("vit_small_patch14_dinov2.lvd142m", "random", 518)  # native 37x37 grid
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": state}, tmp_path / "w.pth")
    from_st = create_backbone("vit_small_patch14_dinov2.lvd142m", tmp_path / "w.safetensors", 224)
    from_pth = create_backbone("vit_small_patch14_dinov2.lvd142m", tmp_path / "w.pth", 224)
    assert from_st.pos_embed.shape == (1, 257, 384)
    assert torch.equal(from_st.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert weights_digest(from_st) == weights_digest(from_pth) != weights_digest(source)
    sharp = create_backbone("vit_small_patch14_dinov2.lvd142m", tmp_path / "w.safetensors", 224, antialias=False)
    assert not torch.allclose(sharp.pos_embed, from_st.pos_embed)


def test_missing_or_wrong_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneWeightsError, match=r"vit_small_patch16_224\.dino.*backbone\.weights"):
        create_backbone("vit_small_patch16_224.dino")  # no network, no hub cache
    with pytest.raises(BackboneWeightsError, match="not found: .*absent.pth"):
        create_backbone("vit_small_patch16_224.dino", tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BackboneWeightsError, match="cannot read backbone weights .*junk.pth"):
        create_backbone("vit_small_patch16_224.dino", tmp_path / "junk.pth")
    save_file({"foo": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(BackboneWeightsError, match="does not fit backbone"):
        create_backbone("vit_small_patch16_224.dino", tmp_path / "other.safetensors")
    with pytest.raises(BackboneWeightsError, match="unknown or unsupported timm backbone 'no_such_vit'"):
        create_backbone("no_such_vit", "random")
