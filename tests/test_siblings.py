"""Sibling contrast (a taxonomic key): the loss, greedy masking against the best sibling, top-down prediction."""

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_vit
from taxotrait.data import AugmentConfig
from taxotrait.errors import DatasetError
from taxotrait.masking import greedy_head_masking, trait_heads
from taxotrait.model import PromptCAM, PromptConfig, families
from taxotrait.steps.evaluate import children_columns
from taxotrait.taxonomy import parent_index
from taxotrait.token_cache import TokenCache, TokenDataset, build_token_cache
from taxotrait.train import TrainConfig, contrast_loss, predict, rival_loss, sibling_top1, train

# 7 classes under 3 parents: a fork of three, a fork of three... and a monotypic taxon (P3 has one child)
NAMES = [f"c{i}" for i in range(7)]
PARENTS = ["P1", "P2", "P1", "P2", "P1", "P3", "P2"]


def sibling_model(parents=PARENTS, variant="scalable", depth=1, seed=5):
    torch.manual_seed(seed)
    model = PromptCAM(make_vit(), NAMES, PromptConfig(variant, depth, 2), class_parents=parents)
    with torch.no_grad():
        model.class_prompts.normal_()
        model.head.weight.normal_()
        model.agnostic_prompts.normal_()
    return model.double()


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sibling_loss_equals_separate_per_parent_softmaxes(smoothing):
    model = sibling_model()
    torch.manual_seed(0)
    scores = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 5])
    losses, counted = contrast_loss(scores, labels, model.rivals(labels), smoothing)
    for i, label in enumerate(labels.tolist()):  # the slow way: a softmax over the label's parent's children only
        group = [c for c in range(7) if PARENTS[c] == PARENTS[label]]
        if len(group) == 1:
            assert not counted[i]  # a monotypic taxon: nothing to tell it from, no loss
            continue
        expected = F.cross_entropy(scores[i, group][None], torch.tensor([group.index(label)]),
                                   label_smoothing=smoothing)
        assert counted[i] and torch.allclose(losses[i], expected, atol=1e-12)
    # the gradient of an image's loss reaches its siblings' scores only
    losses[0].backward()
    assert (scores.grad[0, [1, 3, 5, 6]] == 0).all() and (scores.grad[0, [0, 2, 4]] != 0).all()


def test_rank_contrast_is_the_plain_cross_entropy():
    model = sibling_model(parents=None)
    assert model.contrast == "rank"
    scores, labels = torch.randn(5, 7, dtype=torch.float64), torch.tensor([0, 6, 2, 2, 5])
    losses, counted = contrast_loss(scores, labels, model.rivals(labels), 0.1)
    assert counted.all()
    assert torch.allclose(losses, F.cross_entropy(scores, labels, reduction="none", label_smoothing=0.1))
    columns, rivals = model.rival_columns(labels)  # every class is scored, once for all images
    assert torch.equal(columns, torch.arange(7)) and rivals.shape == (5, 7) and rivals.all()


def test_rival_columns_are_each_images_family_padded_with_its_class():
    columns, rivals = sibling_model().rival_columns(torch.tensor([5, 0, 6, 2]))
    assert columns.tolist() == [[5, 5, 5], [0, 2, 4], [1, 3, 6], [0, 2, 4]]  # P3 is monotypic: padding
    assert rivals.tolist() == [[True, False, False]] + [[True] * 3] * 3
    columns, rivals = sibling_model().rival_columns(torch.tensor([5, 5]))
    assert columns.tolist() == [[5], [5]] and rivals.all()


def keys_values_forward(model, tokens):
    """(what the training loop feeds, its scoring) through the kept last-block keys/values (prompt depth 1)."""
    return model.image_keys_values(model.last_block_input(tokens)), model.forward_keys_values


@pytest.mark.parametrize("variant,depth,inputs", [("scalable", 1, "keys_values"), ("scalable", 2, "tokens"),
                                                  ("reference", 3, "tokens")])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_training_scores_siblings_only_with_the_full_losses_and_gradients(variant, depth, inputs, smoothing):
    """A training step scores each image against its family only (B x 3 prompts here, not B x 7), and its losses,
    statistics and gradients are those of all 7 scores masked to the siblings (monotypic images included)."""
    model = sibling_model(variant=variant, depth=depth)
    torch.manual_seed(3)
    tokens = model.frozen_tokens(torch.randn(8, 3, 32, 32, dtype=torch.float64))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 5])  # 5: a monotypic taxon
    names, params = zip(*[(name, p) for name, p in model.named_parameters() if p.requires_grad])

    scores = model.forward_tokens(tokens).float()  # the full computation (float32 scores, as in training)
    losses, counted = contrast_loss(scores, labels, model.rivals(labels), smoothing)
    full_grads = torch.autograd.grad(losses[counted].mean(), params, allow_unused=True)

    x, forward = keys_values_forward(model, tokens) if inputs == "keys_values" else (tokens, model.forward_tokens)
    scored = []

    def spy(x, classes, chunk_size):
        scored.append(tuple(classes.shape))
        return forward(x, classes=classes, chunk_size=chunk_size)

    ours, ours_counted, correct = rival_loss(model, spy, x, labels, smoothing, chunk_size=2)
    assert scored == [(8, 3)]  # each image's family (the largest has 3 classes)
    assert torch.equal(ours_counted, counted) and torch.allclose(ours, losses, atol=1e-6)
    assert torch.equal(correct, model.sibling_prediction(scores, labels) == labels)
    grads = torch.autograd.grad(ours[counted].mean(), params, allow_unused=True)
    assert full_grads[names.index("class_prompts")].abs().sum() > 0
    for ours_grad, full_grad in zip(grads, full_grads):
        assert (ours_grad is None) == (full_grad is None)
        assert ours_grad is None or torch.allclose(ours_grad, full_grad, atol=1e-6)


def test_validation_accuracy_scores_siblings_only(tmp_path):
    """The per-epoch val top-1 (`sibling_top1`) is the full scores' sibling prediction accuracy."""
    model = sibling_model().float()
    rng = np.random.default_rng(0)
    paths = [tmp_path / f"{i}.png" for i in range(14)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    cache = build_token_cache(model, paths, tmp_path / "tokens.npy", progress=False,
                              augment=AugmentConfig(resize=32, crop=False, hflip=False))
    data = TokenDataset(TokenCache.open(cache), np.arange(14) % 7)
    expected = (model.sibling_prediction(predict(model, data), data.labels) == data.labels).double().mean().item()
    assert sibling_top1(model, data, batch_size=4) == pytest.approx(expected, abs=1e-12)


def margin(model, tokens, label, blur):
    """s[label] - best sibling's score, every class scored the slow way (a full forward per call) with `blur`
    [C, heads] bool."""
    scores = model.forward_tokens(tokens[None], blur=blur[None])[0]
    rivals = [c for c in range(model.num_classes) if PARENTS[c] == PARENTS[label] and c != label]
    return scores[label] - scores[rivals].max()


@pytest.mark.parametrize("variant,depth", [("scalable", 1), ("scalable", 2), ("reference", 3)])
def test_sibling_masking_is_greedy_on_the_margin_and_stops_when_a_sibling_would_win(variant, depth):
    model = sibling_model(variant=variant, depth=depth)
    torch.manual_seed(7)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    tokens = model.frozen_tokens(images)
    scores = model.forward_tokens(tokens)
    labels = model.sibling_prediction(scores, torch.tensor([0, 1, 2, 3]))  # correctly classified, as in the workflow
    result = greedy_head_masking(model, tokens, labels, sibling_prompts=1)
    heads = model.num_heads
    for b, label in enumerate(labels.tolist()):
        prompts = result.prompts[b].tolist()
        siblings = [c for c in range(7) if PARENTS[c] == PARENTS[label] and c != label]
        assert prompts[0] == label and prompts[1] == max(siblings, key=lambda c: scores[b, c])  # the best sibling
        blur = torch.zeros(7, heads, dtype=torch.bool)
        for step, candidate in enumerate(result.removal_order[b].tolist()):
            # the slow way: every remaining candidate's margin, from full forwards
            options = {}
            for slot, prompt in enumerate(prompts):
                for head in range(heads):
                    if not blur[prompt, head]:
                        trial = blur.clone()
                        trial[prompt, head] = True
                        options[slot * heads + head] = margin(model, tokens[b], label, trial).item()
            assert candidate == max(options, key=options.get)
            assert result.margin_after[b, step].item() == pytest.approx(options[candidate], abs=1e-9)
            blur[prompts[candidate // heads], candidate % heads] = True
        # trait heads: those left when the next removal would let a sibling win
        trait = result.is_trait[b]
        steps = result.removal_step[b]
        first_kept = int(steps[trait].min())
        kept_margin = result.margin[b] if first_kept == 0 else result.margin_after[b, first_kept - 1]
        assert kept_margin >= 0
        flips = (result.margin_after[b] < 0).nonzero()
        if len(flips):
            assert first_kept == int(flips[0])  # the first removal that flips is a trait head's
        else:
            assert trait.sum() == 1  # never flips: only the last head
    assert result.is_trait.any(1).all()


def test_sibling_heads_count_when_a_siblings_prompt_decides():
    """A head of the sibling's prompt is a candidate: its blur changes the sibling's score, and the rows say so.
    Only the family's prompts go through the last block (3 of the 7)."""
    model = sibling_model()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    class_block, scored = model._class_block, []

    def spy(keys_values, classes, *args):
        scored.append(tuple(classes.shape))
        return class_block(keys_values, classes, *args)

    model._class_block = spy
    result = greedy_head_masking(model, model.frozen_tokens(images), torch.tensor([1, 1, 1]), sibling_prompts=2)
    assert scored == [(3, 3)]
    assert result.prompts.shape == (3, 3) and result.present.all()
    assert (result.prompts[:, 1:] != 1).all() and all(PARENTS[c] == "P2" for c in result.prompts.flatten().tolist())
    # every candidate of every slot removed once
    assert torch.equal(result.removal_order.sort(1).values, torch.arange(3 * model.num_heads).expand(3, -1))


def test_rank_contrast_masking_is_the_papers():
    model = sibling_model(parents=None)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokens = model.frozen_tokens(images)
    result = greedy_head_masking(model, tokens, torch.tensor([2, 5]))
    scores = model.forward_tokens(tokens)
    other = scores.clone()
    other[[0, 1], [2, 5]] = float("-inf")
    assert result.prompts.shape == (2, 1)
    assert torch.allclose(result.margin_after, result.score_after - other.max(1).values[:, None])


def test_trait_heads_stop_before_a_rival_wins():
    margin_after = torch.tensor([[2.0, 1.0, -1.0, -2.0], [4.0, 3.5, 3.2, 3.1], [-0.5, -0.6, -0.7, -0.8],
                                 [1.0, -1.0, 9.0, 9.0]])
    order = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]])
    step = order.argsort(1)
    present = torch.tensor([4, 4, 4, 2])  # image 3: only 2 candidates (absent slot's come last)
    traits = trait_heads(margin_after, step, present)
    assert traits[0].tolist() == [False, True, False, True]  # the removal at step 2 flips: heads 3 and 1 kept
    assert traits[1].tolist() == [False, False, False, True]  # never flips: the last head
    assert traits[2].all()  # flips at once: every head
    assert traits[3].tolist() == [False, True, False, False]  # absent candidates are never traits
    top2 = trait_heads(margin_after, step, present, "top_k", 2)
    assert top2[1].tolist() == [False, False, True, True] and top2[3].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="top_k"):
        trait_heads(margin_after, step, present, "top_k", 3)


def test_top_down_prediction_follows_the_predicted_parent():
    names = [["O1", "O2"], ["F1", "F2", "F3"], ["G1", "G2", "G3", "G4"]]
    parents = [None, torch.as_tensor(parent_index(["O1", "O1", "O2"], names[0], "classes")),
               torch.as_tensor(parent_index(["F1", "F2", "F3", "F3"], names[1], "classes"))]
    scores = [torch.tensor([[2.0, 1.0], [0.0, 1.0]]),
              torch.tensor([[0.0, 1.0, 9.0], [5.0, 0.0, 1.0]]),  # image 0: F3 scores best but is not O1's
              torch.tensor([[0.0, 3.0, 8.0, 9.0], [9.0, 0.0, 1.0, 2.0]])]
    predicted, chosen = scores[0].argmax(1), [scores[0].argmax(1).tolist()]
    for rank_scores, rank_parents in zip(scores[1:], parents[1:]):
        columns, present = children_columns(predicted, families(rank_parents))
        predicted = PromptCAM.best_rival(rank_scores.gather(1, columns), columns, present)
        chosen.append(predicted.tolist())
    assert chosen == [[0, 1], [1, 2], [1, 3]]
    with pytest.raises(DatasetError, match="classes: 1 parents are not classes of the rank above.*'O3'"):
        parent_index(["O1", "O3"], names[0], "classes")


def test_nothing_to_contrast_is_an_error():
    model = PromptCAM(make_vit(), ["a", "b"], class_parents=["A", "B"])  # two monotypic taxa
    with pytest.raises(ValueError, match="nothing to contrast"):
        train(model, None, config=TrainConfig(epochs=1, device="cpu"), progress=False)


@pytest.mark.parametrize("parents", [PARENTS, None], ids=["siblings", "rank"])
def test_extraction_scores_rivals_only_and_stores_the_full_computation(tmp_path, parents):
    """attention.h5's predictions are the full scores' sibling predictions, its scores and maps those of the slot
    classes in the full computation; under 'siblings' no image is scored against more than its family."""
    from taxotrait.attention_store import AttentionFile
    from taxotrait.extract import extract_attention, sibling_classes

    model = sibling_model(parents).float()
    torch.manual_seed(3)
    tokens, labels = torch.randn(10, 17, 32), torch.arange(10) % 7
    scored, forward = [], model.forward_keys_values

    def spy(keys_values, classes=None, chunk_size=None):
        scored.append(tuple(classes.shape))
        return forward(keys_values, classes, chunk_size)

    model.forward_keys_values = spy
    batches = [([f"i{j}" for j in range(s, s + 4)], tokens[s:s + 4], labels[s:s + 4]) for s in (0, 4, 8)]
    batches[-1] = (batches[-1][0][:2], *batches[-1][1:])
    extra = sibling_classes(parents or [""] * 7, 2)
    extract_attention(model, batches, 10, tmp_path / "a.h5", "species", extra, chunk_size=3, progress=False)
    with torch.no_grad():
        full, attention = model.class_scores(model.last_block_input(tokens), return_attention=True)
    maps = attention[..., -16:].unflatten(-1, (4, 4))
    with AttentionFile(tmp_path / "a.h5") as stored, h5py.File(tmp_path / "a.h5") as h5:
        assert torch.equal(torch.from_numpy(stored.predictions), model.sibling_prediction(full, labels))
        slots = stored.classes
        assert slots[:, 0].tolist() == labels.tolist() and (slots[:, 1] == stored.predictions).all()
        for row in range(10):
            for slot, c in enumerate(slots[row]):
                if c < 0:
                    assert np.isnan(h5["scores"][row, slot]) and not stored.maps(row)[slot].any()
                    continue
                assert h5["scores"][row, slot] == pytest.approx(float(full[row, c]), abs=1e-5)
                np.testing.assert_allclose(stored.maps(row)[slot], maps[row, c].numpy(), atol=1e-3)
    widths = {shape[-1] for shape in scored}
    assert widths == ({3} if parents else {7})  # the largest family, or every class (in chunks of 3 inside)
