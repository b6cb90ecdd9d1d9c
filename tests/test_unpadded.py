"""The training speed paths of vaswani.unpadded compute what the plain model computes: training without the
padding rows, Q, K and V as one product, Eq. 1 written out for "sdpa" training on a CPU, and the CPU dropout."""

import pytest
import torch
from helpers import padded_batch, tiny_model

from vaswani import unpadded
from vaswani.modeling import MultiHeadAttention
from vaswani.unpadded import Unpadded


@pytest.mark.parametrize(
    "normalize_before, attn_implementation, hooked",
    [(False, "sdpa", False), (True, "sdpa", False), (False, "eager", False), (False, "sdpa", True)],
)
def test_training_skips_padding_with_the_same_loss_and_gradients(
    monkeypatch, normalize_before, attn_implementation, hooked
):
    """In training the position-wise pieces run on the real tokens only (Unpadded); the loss, the gradients and
    the outputs at real positions equal those of the padded computation. ``hooked``: a hook on every projection
    makes Q, K and V separate products, each padded into the head layout alone."""
    ids, mask = padded_batch(lengths=(9, 6, 3, 9))
    labels = torch.tensor([[7, 8, 9, 3, -100], [9, 3, -100, -100, -100], [3, -100, -100, -100, -100], [5, 6, 7, 8, 3]])
    unpadded_calls = []

    def recording_unpadded(real_tokens):
        unpadded_calls.append(real_tokens.sum().item())
        return Unpadded(real_tokens)

    results = []
    for unpad in (True, False):
        monkeypatch.setattr(unpadded, "Unpadded", recording_unpadded if unpad else lambda real_tokens: None)
        model = tiny_model(
            dropout=0.0, normalize_before=normalize_before, attn_implementation=attn_implementation
        ).train()
        if hooked:
            for module in model.modules():
                if isinstance(module, MultiHeadAttention):
                    for linear in (module.q_proj, module.k_proj, module.v_proj):
                        linear.register_forward_hook(lambda module, args, output: output)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, skip_logits=False)  # logits compared
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out, grads))
    # decoder stack and output layer (the 12 labels), encoder stack and encoder-decoder attention (27 tokens)
    assert sorted(unpadded_calls) == [12, 12, 27, 27]
    (unpadded_out, unpadded_grads), (padded, padded_grads) = results
    assert torch.allclose(unpadded_out.loss, padded.loss, atol=1e-6)
    real = labels != -100
    assert torch.allclose(unpadded_out.logits[real], padded.logits[real], atol=1e-5)
    source = mask.bool()
    encoder_states = unpadded_out.encoder_last_hidden_state
    assert torch.allclose(encoder_states[source], padded.encoder_last_hidden_state[source], atol=1e-5)
    # every other position is zero, also those computed only to round the unpadded row count up
    assert not unpadded_out.logits[~real].any() and not encoder_states[~source].any()
    for name, grad in padded_grads.items():
        assert torch.allclose(unpadded_grads[name], grad, atol=1e-6), name


def test_joint_qkv_projection_in_training_equals_separate_projections():
    """In training, Q, K and V (and the encoder-decoder K, V) are one matrix multiply; with a hook on a
    projection (as adapters and inspection tools add) they run apart and the hook sees every call. Loss and
    gradients agree."""
    ids, mask = padded_batch(lengths=(9, 6, 3, 9))
    labels = torch.tensor([[7, 8, 9, 3, -100], [9, 3, -100, -100, -100], [3, -100, -100, -100, -100], [5, 6, 7, 8, 3]])
    model = tiny_model(dropout=0.0).train()
    results, calls = [], []
    for hooked in (False, True):
        handles = []
        if hooked:
            for module in model.modules():
                if isinstance(module, MultiHeadAttention):
                    handles.append(module.k_proj.register_forward_hook(lambda *args: calls.append(1)))
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        for handle in handles:
            handle.remove()
    layers = model.config.encoder_layers + 2 * model.config.decoder_layers
    assert len(calls) == layers
    (joint_loss, joint_grads), (separate_loss, separate_grads) = results
    torch.testing.assert_close(joint_loss, separate_loss)
    for name, grad in separate_grads.items():
        torch.testing.assert_close(joint_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def _train_outputs(model, implementation, grad, batch):
    model.set_attn_implementation(implementation)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(**batch, skip_logits=False)
    if not grad:
        return out.logits, None
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decoder_mask", [False, True])
def test_sdpa_training_on_cpu_matches_eager_and_torch_kernel(decoder_mask):
    """In training "sdpa" runs Eq. 1 written out: bitwise what "eager" computes (padding, causal and cross
    masks included), and equal to torch's fused kernel up to rounding."""
    ids, mask = padded_batch(lengths=(9, 6, 3))
    labels, label_mask = padded_batch(lengths=(4, 8, 5), seed=2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(label_mask == 0, -100)}
    if decoder_mask:
        batch["decoder_attention_mask"] = label_mask
    model = tiny_model()
    sdpa_logits, sdpa_grads = _train_outputs(model, "sdpa", True, batch)
    eager_logits, eager_grads = _train_outputs(model, "eager", True, batch)
    kernel_logits, _ = _train_outputs(model, "sdpa", False, batch)  # no gradients: torch's kernel
    assert torch.equal(sdpa_logits, eager_logits)
    assert sdpa_grads.keys() == eager_grads.keys()
    assert all(torch.equal(sdpa_grads[n], eager_grads[n]) for n in sdpa_grads)
    torch.testing.assert_close(sdpa_logits, kernel_logits, rtol=1e-5, atol=1e-5)


def test_long_sequences_keep_torch_kernel():
    query = torch.zeros(1, 1, 4, 8, requires_grad=True)
    short, long = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, unpadded.EXPLICIT_ATTENTION_MAX_KEYS + 1, 8)
    assert unpadded.explicit_attention_is_faster(query, short)
    assert not unpadded.explicit_attention_is_faster(query, long)
    assert not unpadded.explicit_attention_is_faster(query.detach(), short)
    with torch.no_grad():
        assert not unpadded.explicit_attention_is_faster(query, short)


def test_additive_mask_from_sdpa_masks():
    allowed = torch.tensor([[[[True, True, False]]]])
    additive = unpadded.additive_mask(allowed, False, 1, 3, torch.device("cpu"))
    assert additive[0, 0, 0, :2].eq(0).all() and additive[0, 0, 0, 2] == torch.finfo(torch.float32).min
    causal = unpadded.additive_mask(None, True, 2, 3, torch.device("cpu"))  # 1 cached position + 2 new
    assert (causal == 0).tolist() == [[True, True, False], [True, True, True]]
    assert unpadded.additive_mask(None, False, 3, 3, torch.device("cpu")) is None


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_keeps_1_minus_p_scaled_and_backpropagates_through_the_same_mask(p, dtype):
    x = torch.full((1000, 1000), 2.0, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = unpadded.apply_dropout(x, p)
    kept = y != 0
    assert y.dtype == dtype
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # 1M draws: std 0.0005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.to(dtype) / (1 - p))
    torch.manual_seed(0)
    assert torch.equal(unpadded.apply_dropout(x.detach(), p), y.detach())  # the seeded generator decides


def test_dropout_is_identity_in_eval_and_at_zero():
    x = torch.randn(3, 5)
    assert unpadded.apply_dropout(x, 0.3, training=False) is x
    assert unpadded.apply_dropout(x, 0.0) is x
    layer = unpadded.FastDropout(0.3).eval()
    assert layer(x) is x
    assert torch.equal(unpadded.apply_dropout(x, 1.0), torch.zeros_like(x))
