"""ONNX (``pip install vaswani[onnx]``): ``vaswani export onnx`` and greedy decoding with ONNX Runtime.

The export goes through the Marian form (:func:`~vaswani.convert.vaswani_to_marian`, exact for both sinusoid
layouts), as optimum's seq2seq exports do: ``encoder_model.onnx`` (``input_ids``, ``attention_mask`` →
``last_hidden_state``) and ``decoder_model.onnx`` (``input_ids``, ``encoder_hidden_states``,
``encoder_attention_mask`` → ``logits``), with the Marian config, generation config and tokenizer beside them.
The decoder recomputes the whole prefix each step (no cache inputs): the simplest graph that every runtime runs.

It uses ``torch.onnx.export`` with the dynamo exporter, not optimum-onnx: optimum-onnx 0.1 requires transformers
< 4.58, and this package needs transformers 5.24. The Marian form is exported with eager attention, whose masks
trace as computations on the inputs (the TorchScript exporter freezes transformers 5's masks for the example's
shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .convert import check_export_folder, load_vaswani_for_export, vaswani_to_marian, write_folder_whole

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"ONNX Runtime is not installed ({err}); install it: pip install vaswani[onnx]") from None
    return onnxruntime


class _Encoder(nn.Module):
    def __init__(self, marian: nn.Module) -> None:
        super().__init__()
        self.encoder = marian.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Decoder(nn.Module):
    def __init__(self, marian: nn.Module) -> None:
        super().__init__()
        self.marian = marian

    def forward(
        self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.marian(
            encoder_outputs=(encoder_hidden_states,),
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            use_cache=False,
        ).logits


def export_onnx(model_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> None:
    """``vaswani export onnx``: a Vaswani model folder (or Hub id) → encoder and decoder ONNX graphs of its Marian
    form, with the Marian config, generation config and tokenizer. Written whole or not at all (as
    :func:`~vaswani.convert.export_marian`)."""
    _import_onnxruntime()
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError as err:
        raise ImportError(f"The ONNX exporter needs onnxscript ({err}); pip install vaswani[onnx]") from None
    out = Path(output_dir)
    check_export_folder(out, overwrite)
    model, tokenizer = load_vaswani_for_export(model_dir)
    marian = vaswani_to_marian(model).eval()
    marian.set_attn_implementation("eager")
    sentences, source, target = torch.export.Dim("sentences"), torch.export.Dim("source"), torch.export.Dim("target")
    ids = torch.full((2, 5), marian.config.eos_token_id)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    states = torch.zeros(2, 5, marian.config.d_model)
    prefix = torch.full((2, 3), marian.config.decoder_start_token_id)

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        with torch.no_grad():
            torch.onnx.export(
                _Encoder(marian),
                (ids, mask),
                folder / ENCODER_FILE,
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_shapes=({0: sentences, 1: source}, {0: sentences, 1: source}),
                dynamo=True,
                verbose=False,
            )
            torch.onnx.export(
                _Decoder(marian),
                (prefix, states, mask),
                folder / DECODER_FILE,
                input_names=["input_ids", "encoder_hidden_states", "encoder_attention_mask"],
                output_names=["logits"],
                dynamic_shapes=({0: sentences, 1: target}, {0: sentences, 1: source}, {0: sentences, 1: source}),
                dynamo=True,
                verbose=False,
            )
        marian.config.save_pretrained(folder)
        marian.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder_whole(out, write)


class OnnxGreedyTranslator:
    """Greedy decoding of an exported folder with ONNX Runtime: the encoder once, then the decoder on the growing
    prefix until every sentence has produced ``</s>`` or ``max_new_tokens`` tokens."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        ort = _import_onnxruntime()
        from transformers import AutoConfig

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        folder = Path(folder)
        self.encoder = ort.InferenceSession(str(folder / ENCODER_FILE), options, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(folder / DECODER_FILE), options, providers=["CPUExecutionProvider"])
        config = AutoConfig.from_pretrained(folder)
        self.start, self.eos, self.pad = config.decoder_start_token_id, config.eos_token_id, config.pad_token_id

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """The decoder's logits ``[sentences, prefix length, vocab]`` for ``prefix`` after encoding the source."""
        (states,) = self.encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        feed = {"input_ids": prefix, "encoder_hidden_states": states, "encoder_attention_mask": attention_mask}
        return self.decoder.run(None, feed)[0]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """``[sentences, 1 + generated]`` token ids starting with the decoder start token, padded after ``</s>``
        (the layout of ``model.generate(num_beams=1)``)."""
        input_ids, attention_mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
        (states,) = self.encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        tokens = np.full((len(input_ids), 1), self.start, dtype=np.int64)
        done = np.zeros(len(input_ids), dtype=bool)
        for _ in range(max_new_tokens):
            feed = {"input_ids": tokens, "encoder_hidden_states": states, "encoder_attention_mask": attention_mask}
            following = self.decoder.run(None, feed)[0][:, -1].argmax(axis=-1)
            following = np.where(done, self.pad, following)
            tokens = np.concatenate([tokens, following[:, None]], axis=1)
            done |= following == self.eos
            if done.all():
                break
        return tokens
