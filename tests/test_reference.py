"""Checked against independent implementations: torch.nn.Transformer and transformers' MarianMTModel."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import padded_batch, tiny_model
from transformers import MarianConfig, MarianMTModel

from vaswani.convert import marian_to_vaswani, vaswani_to_marian


def _copy_attention(ours, theirs: torch.nn.MultiheadAttention) -> None:
    theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
    theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    theirs.out_proj.weight.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.copy_(ours.out_proj.bias)


def _copy_linear_norm(pairs) -> None:
    for ours, theirs in pairs:
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)


@torch.no_grad()
def test_matches_torch_nn_transformer():
    model = tiny_model(seed=4)
    model.set_attn_implementation("eager")
    reference = torch.nn.Transformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        activation="relu",
        batch_first=True,
        norm_first=False,
    ).eval()
    # nn.Transformer adds a final LayerNorm to each stack even in post-norm; the paper (and we) have none.
    reference.encoder.norm = torch.nn.Identity()
    reference.decoder.norm = torch.nn.Identity()
    for ours, theirs in zip(model.model.encoder.layers, reference.encoder.layers):
        _copy_attention(ours.self_attn, theirs.self_attn)
        _copy_linear_norm(
            [
                (ours.feed_forward.fc1, theirs.linear1),
                (ours.feed_forward.fc2, theirs.linear2),
                (ours.self_attn_add_norm.layer_norm, theirs.norm1),
                (ours.feed_forward_add_norm.layer_norm, theirs.norm2),
            ]
        )
    for ours, theirs in zip(model.model.decoder.layers, reference.decoder.layers):
        _copy_attention(ours.self_attn, theirs.self_attn)
        _copy_attention(ours.encoder_attn, theirs.multihead_attn)
        _copy_linear_norm(
            [
                (ours.feed_forward.fc1, theirs.linear1),
                (ours.feed_forward.fc2, theirs.linear2),
                (ours.self_attn_add_norm.layer_norm, theirs.norm1),
                (ours.encoder_attn_add_norm.layer_norm, theirs.norm2),
                (ours.feed_forward_add_norm.layer_norm, theirs.norm3),
            ]
        )

    ids, mask = padded_batch()
    dec = torch.tensor([[2, 5, 6, 7, 8]] * 3)
    ours = model.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)

    shared = model.get_input_embeddings()
    src = model.model.encoder.embed(shared(ids))
    tgt = model.model.decoder.embed(shared(dec))
    padding = mask == 0
    memory = reference.encoder(src, src_key_padding_mask=padding)
    valid = mask.bool()
    assert (memory[valid] - ours.encoder_last_hidden_state[valid]).abs().max() < 1e-5
    causal = torch.nn.Transformer.generate_square_subsequent_mask(dec.shape[1])
    decoded = reference.decoder(
        tgt, memory, tgt_mask=causal, memory_key_padding_mask=padding, tgt_is_causal=True
    )
    assert (decoded - ours.last_hidden_state).abs().max() < 1e-5


def _random_marian(seed: int = 0, **overrides) -> MarianMTModel:
    torch.manual_seed(seed)
    values = dict(
        vocab_size=120,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        pad_token_id=119,
        decoder_start_token_id=119,
        eos_token_id=0,
        max_position_embeddings=128,
        activation_function="swish",
        scale_embedding=True,
    )
    values.update(overrides)
    marian = MarianMTModel(MarianConfig(**values)).eval()
    with torch.no_grad():
        marian.final_logits_bias.normal_()
    return marian


def _marian_batch():
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 119, (3, 10), generator=generator)
    ids[:, -1] = 0
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 119, 0
    ids[1, 5] = 0
    return ids, mask


@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_marian_conversion_round_trip(shared):
    overrides = (
        {}
        if shared
        else {
            "share_encoder_decoder_embeddings": False,
            "decoder_vocab_size": 120,
            "tie_word_embeddings": False,
        }
    )
    marian = _random_marian(**overrides)
    model = marian_to_vaswani(marian)
    ids, mask = _marian_batch()
    dec = torch.randint(1, 119, (3, 6))
    expected = marian(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (expected - got).abs().max() < 1e-4
    for kwargs in ({"num_beams": 1}, {"num_beams": 4}):
        assert torch.equal(
            marian.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **kwargs),
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **kwargs),
        )
    back = vaswani_to_marian(model)
    assert (
        back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits - expected
    ).abs().max() < 1e-4


def test_export_refuses_what_marian_cannot_express():
    with pytest.raises(ValueError, match="Cannot export to Marian: normalize_before=True"):
        vaswani_to_marian(tiny_model(normalize_before=True, sinusoid_layout="concatenated"))
    with pytest.raises(ValueError, match="learned positions"):
        vaswani_to_marian(tiny_model(position_embedding_type="learned"))


def test_remote_code_loads_without_package(tmp_path):
    """A saved folder runs with trust_remote_code in a process where `vaswani` cannot be imported: decoding, and a
    training step through the speed paths (padding removed, the fused output layer and loss)."""
    model = tiny_model()
    model.config.auto_map = {"AutoModel": "modeling.VaswaniModel"}
    model.save_pretrained(tmp_path)
    siblings = {"unpadded.py", "losses.py", "perf.py", "generation.py", "decoding.py", "pipeline.py"}
    assert {"configuration.py", "modeling.py", *siblings} <= {p.name for p in tmp_path.iterdir()}
    ids, mask = padded_batch()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)  # the same dropout masks in both processes
    loss = model.train()(input_ids=ids, attention_mask=mask, labels=labels, smoothing=0.1, skip_logits=True).loss
    probe = {"ids": ids, "mask": mask, "labels": labels, "expected": expected, "loss": loss.detach()}
    torch.save(probe, tmp_path / "probe.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["vaswani"] = None  # the package is not importable here
        import torch
        from transformers import AutoModel, AutoModelForSeq2SeqLM
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        model = AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.generate(input_ids=probe["ids"], attention_mask=probe["mask"], max_new_tokens=8)
        assert torch.equal(out, probe["expected"]), (out, probe["expected"])
        torch.manual_seed(0)
        loss = model.train()(input_ids=probe["ids"], attention_mask=probe["mask"], labels=probe["labels"],
                             smoothing=0.1, skip_logits=True).loss
        assert torch.allclose(loss, probe["loss"], atol=1e-5), (loss, probe["loss"])
        loss.backward()
        base = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(base).__name__ == "VaswaniModel"
        print("remote-ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert "remote-ok" in result.stdout, result.stderr[-3000:]
