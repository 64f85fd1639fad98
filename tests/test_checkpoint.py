"""Checkpoint round trips, safe loading, and import of the authors' checkpoints."""

import pytest
import torch

from conftest import make_vit
from taxotrait.backbone import AUTHORS_NORMALISATION, create_backbone
from taxotrait.checkpoint import CheckpointError, load_checkpoint, load_official_checkpoint, read_checkpoint, save_checkpoint
from taxotrait.naive import naive_forward
from test_model import CLASSES, build


def test_round_trip_restores_logits_and_metadata(tmp_path, images):
    model = build("scalable", 2, dtype=torch.float32)
    path = save_checkpoint(model, tmp_path / "rank" / "model.pt", rank="genus")
    payload = torch.load(path, weights_only=True)  # no pickled code
    assert set(payload["state_dict"]) == {"agnostic_prompts", "class_prompts", "head.weight", "head.bias"}
    assert payload["metadata"] == {"rank": "genus"}
    assert payload["config"]["class_names"] == CLASSES and payload["config"]["prompt_depth"] == 2
    restored = load_checkpoint(path, backbone=model.backbone)
    assert torch.equal(restored(images), model(images))
    assert restored.normalisation == model.normalisation


def test_wrong_backbone_weights_are_refused(tmp_path):
    model = build("scalable", 1, dtype=torch.float32)
    path = save_checkpoint(model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path, backbone=make_vit(seed=9))


def test_unreadable_and_foreign_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        read_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*not a taxotrait checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")


def authors_checkpoint(path, vit, num_classes, seed=0):
    """A checkpoint laid out as the authors' training code saves it."""
    torch.manual_seed(seed)
    state = dict(vit.state_dict())
    state["vpt.prompt_embeddings"] = torch.randn(len(vit.blocks), num_classes, vit.embed_dim)
    state["head.weight"] = torch.randn(1, vit.embed_dim)
    state["head.bias"] = torch.randn(1)
    torch.save({"model_state_dict": state}, path)
    return state


def test_official_checkpoint_by_timm_name(tmp_path):
    vit = create_backbone("vit_tiny_patch16_224", "random", 224)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.05)
    state = authors_checkpoint(tmp_path / "model.pt", vit, 3)
    model = load_official_checkpoint(tmp_path / "model.pt", "vit_tiny_patch16_224", ["a", "b", "c"])
    assert model.prompt_config.variant == "reference" and model.normalisation == AUTHORS_NORMALISATION
    assert torch.equal(model.agnostic_prompts, state["vpt.prompt_embeddings"][:-1])
    assert torch.equal(model.class_prompts, state["vpt.prompt_embeddings"][-1])
    assert torch.equal(model.backbone.blocks[5].mlp.fc1.weight, vit.blocks[5].mlp.fc1.weight)
    images = torch.randn(2, 3, 224, 224)
    scores, attention = naive_forward(model, images)
    assert torch.allclose(model(images), scores, atol=1e-5)
    maps = model.class_attention(images, torch.arange(3))
    assert maps.shape == (2, 3, 3, 14, 14)
    assert torch.allclose(maps.flatten(-2), attention[..., -196:], atol=1e-6)


def test_official_checkpoint_errors(tmp_path):
    vit = make_vit()
    authors_checkpoint(tmp_path / "model.pt", vit, 3)
    with pytest.raises(CheckpointError, match="3 classes but 2 class names"):
        load_official_checkpoint(tmp_path / "model.pt", make_vit(), ["a", "b"])
    torch.save({"model_state_dict": vit.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt.*vpt.prompt_embeddings"):
        load_official_checkpoint(tmp_path / "plain.pt", make_vit())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_official_checkpoint(tmp_path / "model.pt", make_vit(reg_tokens=2))
