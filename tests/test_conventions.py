"""transformers' model conventions: every weight is initialised and reported when a checkpoint lacks it, and
the cache's old name ``past_key_values`` still works with a deprecation warning."""

import pytest
import torch
from helpers import padded_batch, tiny_config
from safetensors.torch import save_file

from vaswani import VaswaniForConditionalGeneration, VaswaniModel

CLASSES = [VaswaniModel, VaswaniForConditionalGeneration]
SHARING = [True, False]  # one embedding for source and target, or a separate target table


def _real_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Each parameter once, under its first name (tied copies are the same object)."""
    return dict(model.named_parameters())


@pytest.mark.parametrize("share", SHARING)
@pytest.mark.parametrize("cls", CLASSES)
def test_loading_without_any_weight_initialises_and_reports_every_parameter(cls, share):
    model, info = cls.from_pretrained(
        None, config=tiny_config(share_encoder_decoder_embeddings=share), state_dict={}, output_loading_info=True
    )
    parameters = _real_parameters(model)
    assert [name for name, p in parameters.items() if p.device.type == "meta"] == []
    assert set(parameters) <= set(info["missing_keys"])
    embedding = model.get_input_embeddings().weight
    assert abs(embedding[1:].std().item() - 32**-0.5) < 0.2 * 32**-0.5  # N(0, d_model^-0.5), padding row 0
    if cls is VaswaniForConditionalGeneration:
        assert model.lm_head.weight is model.get_decoder().embed_tokens.weight


@pytest.mark.parametrize("share", SHARING)
@pytest.mark.parametrize("cls", CLASSES)
def test_reload_of_an_emptied_checkpoint_reports_every_parameter_missing(cls, share, tmp_path):
    cls(tiny_config(share_encoder_decoder_embeddings=share)).save_pretrained(tmp_path)
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert set(_real_parameters(model)) <= set(info["missing_keys"])
    assert all(p.device.type != "meta" for p in model.parameters())


@pytest.mark.parametrize("cls", CLASSES)
def test_save_and_reload_misses_nothing(cls, tmp_path):
    torch.manual_seed(0)
    model = cls(tiny_config())
    model.save_pretrained(tmp_path)
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    for name, parameter in _real_parameters(loaded).items():
        assert torch.equal(parameter, model.get_parameter(name)), name


@pytest.mark.parametrize("cls", CLASSES)
def test_past_key_values_is_the_deprecated_name_of_cache(cls):
    torch.manual_seed(0)
    model = cls(tiny_config()).eval()
    ids, mask = padded_batch()
    start = torch.full((ids.shape[0], 1), 2)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=True)
        step = {"encoder_outputs": (first.encoder_last_hidden_state,), "attention_mask": mask,
                "decoder_input_ids": torch.full_like(start, 5), "use_cache": True}
        cache_length = first.cache.get_seq_length()
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            old = model(past_key_values=first.cache, **step)
        assert old.cache.get_seq_length() == cache_length + 1  # the cache was used and extended
        both = torch.cat([start, step["decoder_input_ids"]], dim=1)
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=both)
    last = (old.last_hidden_state if cls is VaswaniModel else old.logits)[:, -1]
    expected = (full.last_hidden_state if cls is VaswaniModel else full.logits)[:, -1]
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=1e-5)
