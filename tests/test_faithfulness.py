"""Insertion/deletion on toy models with known answers, and the baselines (linear probe, CAMs, Finer-CAM,
rollout)."""

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from taxotrait import faithfulness as fa
from taxotrait.baselines import (CAM_METHODS, LinearProbe, _cam_class, attention_rollout, block_first_token, cam_maps,
                                 eigen_projection, FinerTarget, fit_linear_probe, load_probe, nearest_rivals,
                                 save_probe, vit_reshape)
from taxotrait.model import class_rivals

SIZE = 8  # 8 x 8 images: 64 pixels


def mean_model(x):
    """Two classes; class 0's probability is the mean of channel 0 over the pixels (logits log p, log(1 - p))."""
    p = x[:, 0].mean((1, 2)).clamp(1e-12, 1 - 1e-12)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


def half_image():
    """Channel 0 is 1 on the left half, 0 on the right: class 0 has probability 0.5."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    x[:, 0, :, : SIZE // 2] = 1
    return x


def saliency_on(left: bool):
    s = torch.zeros(1, SIZE, SIZE)
    s[:, :, : SIZE // 2] = 1.0 if left else 0.0
    s[:, :, SIZE // 2 :] = 0.0 if left else 1.0
    return s


def test_pixel_order_breaks_ties_by_index_every_run():
    saliency = torch.tensor([[[0.5, 1.0, 0.5], [1.0, 0.0, 0.5]]])
    order = fa.pixel_order(saliency)
    assert order.tolist() == [[1, 3, 0, 2, 5, 4]]  # the 1.0s in index order, then the 0.5s, then 0
    for _ in range(3):
        assert torch.equal(fa.pixel_order(saliency.clone()), order)
    rank = fa.pixel_rank(saliency)
    assert torch.equal(order[0][rank[0]], torch.arange(6))  # rank is the inverse permutation
    uniform = fa.pixel_order(torch.ones(1, 4, 4))
    assert uniform.tolist() == [list(range(16))]  # a flat map: raster order


def test_step_counts_and_trapezoid():
    assert fa.step_counts(10, 4).tolist() == [0, 4, 8, 10]
    assert fa.step_counts(224 * 224, 224).shape == (225,)  # RISE: 224 steps at 224 px
    fractions = torch.tensor([0.0, 0.5, 1.0])
    assert fa.auc(fractions, torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        fa.step_counts(10, 0)


@pytest.mark.parametrize("left, expected", [(True, 0.125), (False, 0.375)])
def test_deletion_auc_known_answer(left, expected):
    # deleting the informative left half first: p falls linearly 0.5 -> 0 over the first half, then stays 0
    # (area 0.125); deleting the right half first: p stays 0.5 for half the pixels, then falls (area 0.375)
    result = fa.insertion_deletion(mean_model, half_image(), saliency_on(left), torch.tensor([0]), pixels_per_step=4)
    assert len(result.fractions) == 17 and result.fractions[-1] == 1.0
    assert result.deletion[0, 0].item() == pytest.approx(0.5) and result.deletion[0, -1].item() == pytest.approx(0)
    assert result.deletion_auc.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("left, expected", [(True, 0.375), (False, 0.125)])
def test_insertion_auc_known_answer(monkeypatch, left, expected):
    # with a blur that removes everything (all zeros), inserting the informative half first rises to 0.5 at
    # half the pixels (area 0.125 + 0.25)
    monkeypatch.setattr(fa, "blur", lambda x, k, s: torch.zeros_like(x))
    result = fa.insertion_deletion(mean_model, half_image(), saliency_on(left), torch.tensor([0]), pixels_per_step=4)
    assert result.insertion_auc.item() == pytest.approx(expected, abs=1e-6)


def test_uniform_map_removes_pixels_in_raster_order():
    # a flat map ranks pixels row by row: each row holds half of the informative pixels -> p falls linearly
    result = fa.insertion_deletion(mean_model, half_image(), torch.ones(1, SIZE, SIZE), torch.tensor([0]),
                                   pixels_per_step=SIZE)
    assert result.deletion_auc.item() == pytest.approx(0.25, abs=1e-6)


def test_insertion_starts_from_the_gaussian_blurred_image_and_deletion_uses_zero():
    torch.manual_seed(0)
    images = torch.randn(2, 3, SIZE, SIZE)
    result = fa.insertion_deletion(mean_model, images, torch.rand(2, 2, 2), torch.tensor([0, 1]), pixels_per_step=16)
    blurred = gaussian_blur(images, [11, 11], [5.0, 5.0])
    start = mean_model(blurred).softmax(-1)
    assert torch.allclose(result.insertion[:, 0], start[[0, 1], [0, 1]].double(), atol=1e-6)
    end = mean_model(torch.zeros(1, 3, SIZE, SIZE)).softmax(-1)[0]
    assert torch.allclose(result.deletion[:, -1], end[[0, 1]].double(), atol=1e-6)
    assert torch.allclose(result.insertion[:, -1], mean_model(images).softmax(-1)[[0, 1], [0, 1]].double(), atol=1e-6)


def test_batching_does_not_change_the_curves():
    torch.manual_seed(0)
    images, saliency = torch.randn(3, 3, SIZE, SIZE), torch.rand(3, 4, 4)
    targets = torch.tensor([0, 1, 0])
    a = fa.insertion_deletion(mean_model, images, saliency, targets, pixels_per_step=8, batch_size=1)
    b = fa.insertion_deletion(mean_model, images, saliency, targets, pixels_per_step=8, batch_size=64)
    assert torch.equal(a.insertion, b.insertion) and torch.equal(a.deletion, b.deletion)
    # the curves' ends scored once for every map of a model, and the softmax restricted to rivals
    ends = fa.endpoint_probabilities(mean_model, images, targets)
    other = fa.insertion_deletion(mean_model, images, torch.rand(3, 4, 4), targets, pixels_per_step=8, endpoints=ends)
    assert torch.equal(other.deletion[:, [0, -1]], a.deletion[:, [0, -1]]) and torch.equal(
        other.insertion[:, [0, -1]], a.insertion[:, [0, -1]]) and not torch.equal(other.deletion, a.deletion)
    alone = torch.tensor([[True, False], [False, True], [True, False]])  # each target its only rival: probability 1
    only = fa.insertion_deletion(mean_model, images, saliency, targets, pixels_per_step=8, rivals=alone)
    assert torch.equal(only.deletion, torch.ones_like(only.deletion))


# ------------------------------------------------------------------------------------------------ baselines
def test_probe_features_are_the_final_norm_cls_token(tiny_vit, images):
    probe = LinearProbe(tiny_vit, ["a", "b"])
    tokens = probe.frozen_tokens(images)
    assert torch.allclose(probe.features(tokens), tiny_vit.forward_features(images)[:, 0], atol=1e-5)
    x = torch.randn(2, 5, tiny_vit.embed_dim)
    assert torch.allclose(block_first_token(tiny_vit.blocks[-1], x), tiny_vit.blocks[-1](x)[:, 0], atol=1e-5)
    deeper = LinearProbe(tiny_vit, ["a", "b"], first_block=1)  # the cache of prompt depth 2
    assert torch.allclose(deeper.features(deeper.frozen_tokens(images)), probe.features(tokens), atol=1e-5)


def test_fit_linear_probe_separates_and_roundtrips(tiny_vit, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(60, tiny_vit.embed_dim)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    weight, bias, l2 = fit_linear_probe(x, y, 3, x[:20], y[:20])
    assert ((x @ weight.T + bias).argmax(1) == y).float().mean() > 0.9 and l2 in (1e-4, 1e-3, 1e-2)
    probe = LinearProbe(tiny_vit, ["a", "b", "c"])
    with torch.no_grad():
        probe.head.weight.copy_(weight)
        probe.head.bias.copy_(bias)
    save_probe(probe, tmp_path / "probe.pt", "tiny", rank="genus")
    loaded, meta = load_probe(tmp_path / "probe.pt", tiny_vit)
    assert meta["rank"] == "genus" and torch.equal(loaded.head.weight, probe.head.weight)


def finer_cam_of_the_package(model, layer, reshape, images, category, comparisons=None):
    """pytorch-grad-cam's own FinerCAM (GradCAM on the patch grid) of `category` for each image, with its default
    comparison classes (those nearest in score) and alpha unless `comparisons` (positions in that order) are given."""
    from pytorch_grad_cam import FinerCAM

    finer = FinerCAM(model, [layer], reshape, base_method=_cam_class("grad_cam", (4, 4)))
    finer.compute_input_gradient = True  # the backbone is frozen
    try:
        return np.concatenate([finer(image[None], target_idx=int(category), comparison_categories=comparisons)
                               for image in images])
    finally:
        finer.base_cam.activations_and_grads.release()


@pytest.mark.parametrize("reg_tokens", [0, 4])
@pytest.mark.parametrize("method", CAM_METHODS)
def test_cams_from_tokens_equal_cams_of_the_image_model(method, reg_tokens, images):
    """The CAMs from cached tokens are those of the image model made by the package itself: Finer-CAM its FinerCAM
    over every class (contrast 'rank'), the three classes nearest in score of five compared with."""
    from conftest import make_vit
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    vit = make_vit(reg_tokens=reg_tokens)
    probe = LinearProbe(vit, ["a", "b", "c", "d", "e"])
    torch.manual_seed(0)
    torch.nn.init.normal_(probe.head.weight)
    targets = torch.tensor([0, 2, 1])
    from_tokens = cam_maps(method, probe, probe.frozen_tokens(images), targets)
    assert from_tokens.shape == (3, 4, 4) and from_tokens.min() >= 0 and from_tokens.max() <= 1 + 1e-6
    layer, reshape = vit.blocks[-1].norm1, vit_reshape(vit.num_prefix_tokens, (4, 4))
    if method == "finer_cam":
        from_images = np.concatenate([finer_cam_of_the_package(probe, layer, reshape, images[i : i + 1], t)
                                      for i, t in enumerate(targets)])
    else:
        cam = _cam_class(method, (4, 4))(model=probe, target_layers=[layer], reshape_transform=reshape)
        cam.compute_input_gradient = True
        from_images = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        cam.activations_and_grads.release()
    assert np.allclose(from_tokens, from_images, atol=1e-4)


def test_attention_rollout(tiny_vit, images):
    rollout = attention_rollout(tiny_vit, images)
    assert rollout.shape == (3, 4, 4) and (rollout >= 0).all() and (rollout.sum((1, 2)) < 1).all()
    # all residual: the rollout is the identity, the CLS token attends to itself only
    assert torch.allclose(attention_rollout(tiny_vit, images, residual=1.0), torch.zeros(3, 4, 4))


def test_sibling_grad_cam_is_the_gradient_of_the_score_against_its_siblings(tiny_vit, images):
    """Grad-CAM of s[c] - logsumexp(s[siblings]) computed by hand: gradient at the last block's first norm,
    channel weights = the gradient's mean over the patches, ReLU, min-max normalised."""
    probe = LinearProbe(tiny_vit, ["a1", "a2", "a3", "b1", "b2"])
    torch.manual_seed(0)
    torch.nn.init.normal_(probe.head.weight)
    groups = torch.tensor([0, 0, 0, 1, 1])
    targets = torch.tensor([0, 4, 1])
    tokens = probe.frozen_tokens(images)
    ours = cam_maps("grad_cam", probe, tokens, targets, rivals=class_rivals(groups, targets, 5))
    captured = []
    hook = tiny_vit.blocks[-1].norm1.register_forward_hook(lambda module, args, out: captured.append(out))
    scores = probe.forward_tokens(tokens.clone().requires_grad_(True))  # the backbone is frozen
    hook.remove()
    siblings = {0: [1, 2], 4: [3], 1: [0, 2]}
    objective = sum(scores[i, c] - torch.log(sum(torch.exp(scores[i, j]) for j in siblings[int(c)]))
                    for i, c in enumerate(targets))
    activations = captured[0][:, tiny_vit.num_prefix_tokens:]  # [B, 16 patches, D]
    gradient = torch.autograd.grad(objective, captured[0])[0][:, tiny_vit.num_prefix_tokens:]
    cam = torch.relu((activations * gradient.mean(1, keepdim=True)).sum(-1)).detach().numpy().reshape(3, 4, 4)
    cam = cam - cam.min((1, 2), keepdims=True)
    cam = cam / (1e-7 + cam.max((1, 2), keepdims=True))
    assert np.allclose(ours, cam, atol=1e-4)
    plain = cam_maps("grad_cam", probe, tokens, targets)  # the class score alone: another map
    assert not np.allclose(ours, plain, atol=1e-3)


def test_finer_cam_compares_with_the_siblings_nearest_in_score():
    scores = torch.tensor([0.0, 1.0, 5.0, 1.2, 0.9, 1.05, 7.0, 3.0])
    family = torch.tensor([True, True, True, True, True, False, False, False])  # class 5 is nearest, not a sibling
    assert nearest_rivals(scores, 1, family) == [4, 3, 0]
    assert nearest_rivals(scores, 1, torch.ones(8, dtype=torch.bool)) == [5, 4, 3]  # contrast 'rank'
    classes = torch.arange(8)
    assert nearest_rivals(scores, 6, (classes == 2) | (classes == 6)) == [2]  # fewer rivals than comparisons
    assert nearest_rivals(scores, 7, classes == 7) == []


def test_finer_target_keeps_its_sign_for_a_sure_class():
    """At a margin of 30 the package's FinerWeightedTarget explains the comparison classes (its epsilon outweighs
    their probability); ours has the gradient it has at any margin, the package's at a margin of 3."""
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

    def gradient(target, scores):
        scores = torch.tensor(scores, requires_grad=True)
        target(scores).backward()
        return scores.grad

    ours = gradient(FinerTarget(0, torch.ones(3, dtype=torch.bool)), [30.0, 0.0, -1.0])
    assert torch.allclose(ours, gradient(FinerWeightedTarget(0, [1, 2], 1.0), [3.0, 0.0, -1.0]), atol=1e-5)
    assert ours[0] == 1 and gradient(FinerWeightedTarget(0, [1, 2], 1.0), [30.0, 0.0, -1.0])[0] < 0


class AmongSiblings(torch.nn.Module):
    """The probe's scores of tokens with every class but `siblings` (bool [C]) at -inf: the package's FinerCAM of it
    compares a class with its siblings only."""

    def __init__(self, probe: LinearProbe, siblings: torch.Tensor):
        super().__init__()
        self.probe, self.siblings = probe, siblings

    def forward(self, tokens):
        return self.probe.forward_tokens(tokens).masked_fill(~self.siblings, float("-inf"))


def test_finer_cam_of_the_registry_explains_the_sibling_decision(tiny_vit, images):
    """The registry's Finer-CAM (contrast 'siblings'), for the true class and, where the probe is wrong, its
    prediction: the package's FinerCAM restricted to the class's siblings. Another map than Grad-CAM's for a class
    with several siblings; Grad-CAM's own for a class with one (both explain s[c] - s[d]) or none (s[c] alone)."""
    from taxotrait.methods import METHODS, MapInputs

    names = ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "c1"]
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])  # a family of five, a pair, a class alone
    probe = LinearProbe(tiny_vit, names)
    torch.manual_seed(0)
    torch.nn.init.normal_(probe.head.weight)
    truth, predicted = torch.tensor([1, 5, 7]), np.array([1, 6, 7])  # the probe is wrong on the pair
    tokens = probe.frozen_tokens(images)
    scores = probe.forward_tokens(tokens)
    siblings = class_rivals(groups, truth, len(names))
    everyone = torch.ones(len(names), dtype=torch.bool)
    # on the first image the nearest classes of all are not the nearest siblings: the restriction matters
    assert nearest_rivals(scores[0], 1, everyone) != nearest_rivals(scores[0], 1, siblings[0])
    x = MapInputs(np.zeros((3, 2, 1, 4, 4)), np.ones((3, 1), bool), np.ones((3, 1), bool), probe, tokens, truth,
                  predicted, groups, names, 2, lambda: iter(()))
    maps = METHODS["finer_cam"].maps(x)
    assert maps.shape == (3, 2, 4, 4)
    layer, reshape = tiny_vit.blocks[-1].norm1, vit_reshape(tiny_vit.num_prefix_tokens, (4, 4))
    for i, (c, comparisons) in enumerate([(1, None), (5, [1])]):  # the pair: one sibling to compare with
        package = finer_cam_of_the_package(AmongSiblings(probe, groups == groups[c]), layer, reshape,
                                           tokens[i : i + 1], c, comparisons)
        assert np.allclose(maps[i, 0], package[0], atol=1e-4)
    package = finer_cam_of_the_package(AmongSiblings(probe, groups == 1), layer, reshape, tokens[1:2], 6, [1])
    assert np.allclose(maps[1, 1], package[0], atol=1e-4)
    assert np.array_equal(maps[[0, 2], 1], maps[[0, 2], 0])  # right: the predicted class is the true one
    grad_cam = METHODS["grad_cam"].maps(x)
    assert not np.allclose(maps[0], grad_cam[0], atol=1e-3)
    assert np.allclose(maps[1:], grad_cam[1:], atol=1e-5)


def test_sign_fixed_eigen_cam_is_positive_on_a_planted_blob():
    rng = np.random.default_rng(0)
    for blob_share in (0.1, 0.7):  # the blob a minority or a majority of the positions: the sign must not depend on it
        activations = rng.normal(0, 0.1, (2, 6, 8, 8))
        blob = np.zeros((8, 8), bool)
        blob[: int(8 * blob_share) or 1, :] = True
        direction = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 0.2])  # more active channels on the blob
        activations[:, :, blob] += direction[None, :, None]
        maps = eigen_projection(activations)
        assert (maps[:, blob] > 0).all() and (maps[:, ~blob] < 0).all()


def test_fit_linear_probe_with_the_sibling_softmax():
    """Under contrast 'siblings' the probe only has to tell siblings apart: the loss is train.contrast_loss, and
    the scores of one group are not calibrated against another's."""
    from taxotrait.train import contrast_loss

    torch.manual_seed(0)
    x = torch.randn(80, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # groups {0, 1} and {2, 3}: x0 tells the siblings apart
    groups = torch.tensor([0, 0, 1, 1])
    weight, bias, _ = fit_linear_probe(x, y, 4, groups=groups)
    rivals = class_rivals(groups, y, 4)
    scores = x @ weight.T + bias
    assert (scores.masked_fill(~rivals, float("-inf")).argmax(1) == y).float().mean() > 0.95
    flat_weight, flat_bias, _ = fit_linear_probe(x, y, 4)
    # the sibling fit is the minimum of the contrast loss, not of the flat cross-entropy
    loss = lambda w, b: contrast_loss(x @ w.T + b, y, rivals)[0].mean() + 1e-3 * w.pow(2).sum()  # noqa: E731
    assert loss(weight, bias) < loss(flat_weight, flat_bias)
    with pytest.raises(ValueError, match="no training image has a class with a rival"):
        fit_linear_probe(x, torch.zeros(80, dtype=torch.long), 2, groups=torch.tensor([0, 1]))
