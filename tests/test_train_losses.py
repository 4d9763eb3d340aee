"""Weight maps of Bokhorst et al. 2019 against maps computed by hand, and the weighted loss."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wsiseg_train.losses import sparse_loss, weight_map, weighted_cross_entropy  # noqa: E402

# Patch 0: class 1 three times, class 2 once (only in this patch), 2 unannotated.
# Patch 1: a single class (3, only in this patch), three pixels.
LABELS = torch.tensor([[[1, 1, 2], [0, 1, 0]],
                       [[3, 3, 3], [0, 0, 0]]])


def test_none_is_the_valid_mask():
    w = weight_map(LABELS, 3, "none")
    assert w.tolist() == [[[1, 1, 1], [0, 1, 0]], [[1, 1, 1], [0, 0, 0]]]


def test_instance_weights_by_hand():
    # patch 0: L_I = 4, C_I = 2 -> class 1: 4 / (2 * 3) = 2/3, class 2: 4 / (2 * 1) = 2
    # patch 1: L_I = 3, C_I = 1 -> class 3: 3 / (1 * 3) = 1
    w = weight_map(LABELS, 3, "instance").numpy()
    expected = np.array([[[2 / 3, 2 / 3, 2], [0, 2 / 3, 0]], [[1, 1, 1], [0, 0, 0]]])
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    # every class present in a patch gets the same total weight, L_I / C_I
    assert w[0][LABELS[0].numpy() == 1].sum() == pytest.approx(2.0)
    assert w[0][LABELS[0].numpy() == 2].sum() == pytest.approx(2.0)


def test_minibatch_weights_by_hand():
    # batch: L_B = 7, C_B = 3, counts 1:3, 2:1, 3:3 -> 7/9, 7/3, 7/9
    w = weight_map(LABELS, 3, "minibatch").numpy()
    a, b = 7 / 9, 7 / 3
    expected = np.array([[[a, a, b], [0, a, 0]], [[a, a, a], [0, 0, 0]]])
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w.sum() == pytest.approx(7.0)  # all maps sum to the labelled pixels of the batch


def test_single_class_patch_instance_weights_are_one():
    labels = torch.full((1, 4, 4), 2)
    assert torch.equal(weight_map(labels, 3, "instance"), torch.ones(1, 4, 4))
    assert torch.equal(weight_map(labels, 3, "minibatch"), torch.ones(1, 4, 4))


@pytest.mark.parametrize("weighting", ["none", "instance", "minibatch"])
def test_no_labelled_pixel_gives_finite_loss_and_zero_gradient(weighting):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    loss = sparse_loss(logits, labels, weighting)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_loss_is_weighted_mean_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 3)
    w = weight_map(LABELS, 3, "instance")
    ce = torch.nn.functional.cross_entropy(logits, (LABELS - 1).clamp(min=0), reduction="none")
    expected = (w * ce).sum() / w.sum()
    assert float(weighted_cross_entropy(logits, LABELS, w)) == pytest.approx(float(expected))
    # unannotated pixels do not matter, whatever the logits say there
    logits2 = logits.clone()
    logits2[0, :, 1, 0] = torch.tensor([50.0, -50.0, 0.0])
    assert float(sparse_loss(logits2, LABELS, "instance")) == pytest.approx(
        float(sparse_loss(logits, LABELS, "instance")))


def test_bad_inputs():
    with pytest.raises(ValueError, match="weighting must be one of"):
        weight_map(LABELS, 3, "median")
    with pytest.raises(ValueError, match="label values must be 0..2"):
        weight_map(LABELS, 2, "none")
    with pytest.raises(ValueError, match="do not match"):
        weighted_cross_entropy(torch.zeros(2, 3, 5, 5), LABELS, torch.ones(2, 2, 3))
