"""Label-smoothed cross-entropy (vaswani.training.loss), the model's loss and the Trainer's use of it (the CPU
kernels behind it: test_losses.py)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import padded_batch, tiny_model

from vaswani.training.loss import label_smoothed_cross_entropy, make_compute_loss_func


def _batch(seed: int = 0, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (3, 5), generator=g)
    labels[0, 3:] = -100
    labels[2, 1] = -100
    return logits, labels


def _torch_ce(logits, labels, eps):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=eps, ignore_index=-100)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_matches_torch_label_smoothing(eps):
    logits, labels = _batch()
    ours = label_smoothed_cross_entropy(logits, labels, epsilon=eps)
    torch.testing.assert_close(ours, _torch_ce(logits, labels, eps))


def test_epsilon_zero_is_plain_cross_entropy():
    logits, labels = _batch(1)
    ours = label_smoothed_cross_entropy(logits, labels, epsilon=0.0)
    torch.testing.assert_close(ours, F.cross_entropy(logits.transpose(1, 2), labels))


def test_smoothing_changes_the_loss():
    logits, labels = _batch(2)
    assert not torch.isclose(
        label_smoothed_cross_entropy(logits, labels, 0.1), label_smoothed_cross_entropy(logits, labels, 0.0)
    )


def test_ignored_positions_contribute_nothing():
    logits, labels = _batch(3)
    changed = logits.clone()
    changed[labels == -100] = torch.randn_like(changed[labels == -100]) * 100
    torch.testing.assert_close(
        label_smoothed_cross_entropy(changed, labels), label_smoothed_cross_entropy(logits, labels)
    )
    grad_logits = logits.clone().requires_grad_()
    label_smoothed_cross_entropy(grad_logits, labels).backward()
    assert grad_logits.grad[labels == -100].abs().sum() == 0
    assert grad_logits.grad[labels != -100].abs().sum() > 0
    assert label_smoothed_cross_entropy(logits, torch.full_like(labels, -100)) == 0


def test_num_items_in_batch_divides_the_sum():
    logits, labels = _batch(4)
    n_tokens = int((labels != -100).sum())
    mean = label_smoothed_cross_entropy(logits, labels)
    torch.testing.assert_close(
        label_smoothed_cross_entropy(logits, labels, num_items_in_batch=n_tokens), mean
    )
    doubled = label_smoothed_cross_entropy(logits, labels, num_items_in_batch=torch.tensor(2 * n_tokens))
    torch.testing.assert_close(doubled, mean / 2)


def test_bf16_logits_are_computed_in_fp32():
    logits, labels = _batch(5)
    loss = label_smoothed_cross_entropy(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _torch_ce(logits.bfloat16().float(), labels, 0.1))


def test_bad_arguments():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="epsilon"):
        label_smoothed_cross_entropy(logits, labels, epsilon=1.0)
    with pytest.raises(ValueError, match="vocabulary dimension"):
        label_smoothed_cross_entropy(logits, labels[:, :-1])


def test_compute_loss_func_for_trainer():
    logits, labels = _batch(6)
    loss_func = make_compute_loss_func(epsilon=0.1)
    expected = label_smoothed_cross_entropy(logits, labels, 0.1, num_items_in_batch=7)
    torch.testing.assert_close(loss_func({"logits": logits}, labels, num_items_in_batch=7), expected)
    torch.testing.assert_close(loss_func((logits,), labels, num_items_in_batch=7), expected)


@pytest.mark.parametrize("training", [False, True])
def test_model_loss_with_label_smoothing_is_this_loss(training):
    """``model(labels=..., smoothing=ε).loss`` (what VaswaniTrainer uses) equals this function on the
    model's logits, in training too, where the model computes only the labelled positions."""
    ids, mask = padded_batch(lengths=(9, 6, 3))
    labels = torch.tensor([[7, 8, 3], [9, 3, -100], [3, -100, -100]])
    model = tiny_model(dropout=0.0).train(training)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, smoothing=0.1, skip_logits=False)
    torch.testing.assert_close(out.loss, label_smoothed_cross_entropy(out.logits, labels, 0.1))
    with pytest.raises(ValueError, match="label smoothing epsilon"):
        model(input_ids=ids, attention_mask=mask, labels=labels, smoothing=1.5)
    skipped = model(input_ids=ids, attention_mask=mask, labels=labels, smoothing=0.1, skip_logits=True)
    assert skipped.logits is None
    torch.testing.assert_close(skipped.loss, out.loss)


def test_trainer_asks_for_logits_only_when_it_returns_outputs(tmp_path):
    """A training step (compute_loss without return_outputs) passes skip_logits=True and ε; evaluation
    (return_outputs=True) gets the logits."""
    from transformers import Seq2SeqTrainingArguments

    from vaswani.training.trainer import VaswaniTrainer

    model = tiny_model(dropout=0.0)
    seen = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        seen.append((kwargs.get("skip_logits"), kwargs.get("smoothing")))
        return forward(*args, **kwargs)

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, label_smoothing_factor=0.1
    )
    trainer = VaswaniTrainer(model=model, args=args)
    model.forward = recording_forward
    ids, mask = padded_batch(lengths=(5, 3))
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([[7, 8, 3], [9, 3, -100]])}
    loss = trainer.compute_loss(model, inputs)
    loss_again, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    assert seen == [(True, 0.1), (False, 0.1)]
    assert outputs.logits is not None
    torch.testing.assert_close(loss, loss_again)
