"""Sibling contrast (a taxonomic key): the loss, greedy masking against the best sibling, top-down prediction."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_vit
from taxotrait.masking import greedy_head_masking, trait_heads
from taxotrait.model import PromptCAM, PromptConfig
from taxotrait.taxonomy import top_down_prediction
from taxotrait.train import TrainConfig, contrast_loss, train

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
    """A head of the sibling's prompt is a candidate: its blur changes the sibling's score, and the rows say so."""
    model = sibling_model()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    result = greedy_head_masking(model, model.frozen_tokens(images), torch.tensor([1, 1, 1]), sibling_prompts=2)
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
    parents = [["", ""], ["O1", "O1", "O2"], ["F1", "F2", "F3", "F3"]]
    names = [["O1", "O2"], ["F1", "F2", "F3"], ["G1", "G2", "G3", "G4"]]
    scores = [torch.tensor([[2.0, 1.0], [0.0, 1.0]]),
              torch.tensor([[0.0, 1.0, 9.0], [5.0, 0.0, 1.0]]),  # image 0: F3 scores best but is not O1's
              torch.tensor([[0.0, 3.0, 8.0, 9.0], [9.0, 0.0, 1.0, 2.0]])]
    assert top_down_prediction(scores, parents, names).tolist() == [1, 3]
    assert top_down_prediction(scores[:1], parents[:1], names[:1]).tolist() == [0, 1]


def test_nothing_to_contrast_is_an_error():
    model = PromptCAM(make_vit(), ["a", "b"], class_parents=["A", "B"])  # two monotypic taxa
    with pytest.raises(ValueError, match="nothing to contrast"):
        train(model, None, config=TrainConfig(epochs=1, device="cpu"), progress=False)
