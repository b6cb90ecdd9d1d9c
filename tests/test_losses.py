"""The CPU loss kernels of vaswani.losses compute what torch computes: the label-smoothed cross-entropy in blocks
of rows, and the output layer and loss in one step (skip_logits)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import padded_batch, tiny_model

from vaswani.losses import SmoothedCrossEntropy, output_layer_cross_entropy, token_cross_entropy
from vaswani.training.loss import label_smoothed_cross_entropy


def _torch_ce(logits, labels, eps):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=eps, ignore_index=-100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_blockwise_loss_and_gradient_match_torch(dtype, eps, monkeypatch):
    """The CPU loss (``SmoothedCrossEntropy``, blocks of rows) against ``F.cross_entropy`` on fp32 copies:
    value and gradient, with ignored labels, across several blocks and a last partial one; the logits are
    left unchanged and a second backward (``retain_graph``) gives the same gradient."""
    monkeypatch.setattr(SmoothedCrossEntropy, "rows_per_block", 16)
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(4, 13, 257, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 257, (4, 13), generator=g)
    labels[1, 5:] = -100
    before = logits.clone()
    ours_input = logits.clone().requires_grad_()
    ours = label_smoothed_cross_entropy(ours_input, labels, eps)
    ours.backward(retain_graph=True)
    first = ours_input.grad.clone()
    ours.backward()
    torch.testing.assert_close(ours_input.grad, 2 * first)
    reference_input = logits.float().requires_grad_()
    reference = _torch_ce(reference_input, labels, eps)
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(first.float(), reference_input.grad, **tol)
    assert first.dtype == dtype
    assert torch.equal(ours_input.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_output_layer_and_loss_in_one_step_match_the_two_steps(dtype, bias, monkeypatch):
    """``output_layer_cross_entropy`` (the gradient by the logits computed in the forward, block by block)
    against the output layer followed by ``F.cross_entropy`` in fp32: loss and gradients of the hidden
    states, the weight and the bias, with ignored labels, several blocks and a partial last one; in bf16
    under autocast, as the linear layer runs there."""
    monkeypatch.setattr(SmoothedCrossEntropy, "rows_per_block", 16)
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(24, 301, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(301, 24, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(301, generator=g))
    hidden = torch.randn(2, 27, 24, generator=g, requires_grad=True)
    labels = torch.randint(0, 301, (2, 27), generator=g)
    labels[1, 20:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = output_layer_cross_entropy(layer, hidden, labels, num_items_in_batch=40, label_smoothing=0.1)
    params = [hidden, layer.weight] + ([layer.bias] if bias else [])
    ours_grads = torch.autograd.grad(ours, params)
    if dtype == torch.bfloat16:  # the reference computes on the same bf16-rounded logits, in fp32
        logits = F.linear(hidden.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16() if bias else None).float()
    else:
        logits = layer(hidden)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.1, reduction="sum") / 40
    reference_grads = torch.autograd.grad(reference, params)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(ours, reference, **tol)
    for ours_grad, reference_grad in zip(ours_grads, reference_grads):
        assert ours_grad.dtype == torch.float32
        torch.testing.assert_close(ours_grad, reference_grad, **tol)


def test_output_layer_loss_takes_two_steps_where_one_does_not_apply():
    """Without gradients, or with a hook on the output layer (LoRA, inspection), the logits are computed by
    the layer itself; a frozen weight gets no gradient; mismatched labels are refused by name."""
    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(8, 13)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (10,), generator=g)
    expected = token_cross_entropy(layer(hidden), labels, label_smoothing=0.1)
    with torch.no_grad():
        torch.testing.assert_close(output_layer_cross_entropy(layer, hidden, labels, label_smoothing=0.1), expected)
    seen = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    torch.testing.assert_close(output_layer_cross_entropy(layer, hidden, labels, label_smoothing=0.1), expected)
    assert seen == [(10, 13)]
    handle.remove()
    layer.weight.requires_grad_(False)
    output_layer_cross_entropy(layer, hidden, labels).backward()
    assert layer.weight.grad is None and hidden.grad is not None and layer.bias.grad is not None
    with pytest.raises(ValueError, match="model dimension"):
        output_layer_cross_entropy(layer, hidden, labels[:-1])


@pytest.mark.parametrize("bf16", [False, True])
def test_training_step_without_logits_has_the_gradients_of_one_with_logits(bf16):
    """``skip_logits=True`` (the fused output layer and loss) against ``skip_logits=False`` in training: the
    same loss and gradients of every parameter (dropout off), fp32 and bf16 autocast."""
    ids, mask = padded_batch(lengths=(9, 6, 3, 9))
    labels = torch.tensor([[7, 8, 9, 3, -100], [9, 3, -100, -100, -100], [3, -100, -100, -100, -100], [5, 6, 7, 8, 3]])
    model = tiny_model(dropout=0.0, lm_head_bias=True).train()
    results = []
    for skip_logits in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, smoothing=0.1, skip_logits=skip_logits)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (skipped_loss, skipped_grads) = results
    tol = {"rtol": 1e-5, "atol": 1e-6} if not bf16 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(skipped_loss, loss, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, **tol, msg=name)


def test_a_plain_training_forward_returns_the_loss_without_logits_unless_the_config_asks():
    """``model(..., labels=...)`` in training (what transformers' Trainer and hand-written loops call) takes the
    fused path by default; ``config.training_logits`` (or ``skip_logits=False``) brings the logits back, and
    evaluation always has them."""
    ids, mask = padded_batch(lengths=(9, 6, 3))
    labels = torch.tensor([[7, 8, 3], [9, 3, -100], [3, -100, -100]])
    model = tiny_model(dropout=0.0).train()
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert plain.logits is None and plain.loss is not None
    model.config.training_logits = True
    kept = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert kept.logits.shape == (3, 3, model.config.decoder_vocab_size)
    torch.testing.assert_close(kept.loss, plain.loss)
    model.config.training_logits = False
    assert model(input_ids=ids, attention_mask=mask, labels=labels, skip_logits=False).logits is not None
    assert model.eval()(input_ids=ids, attention_mask=mask, labels=labels).logits is not None
