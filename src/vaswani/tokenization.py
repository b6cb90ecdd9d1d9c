"""The shared source/target BPE tokenizer (Vaswani et al., 2017, §5.1).

The paper encodes both languages with byte-pair encoding into one shared vocabulary (~37,000 tokens
for English-German). This module gives that tokenizer as a ``transformers`` tokenizer backed by a
``tokenizers`` BPE model, and a function that trains one jointly on source and target text.

Design (lossless on real text, so ``batch_decode(..., skip_special_tokens=True)`` gives the text that
sacreBLEU needs):

* no normalizer: the text is encoded as given (casing, accents, umlauts, Unicode forms kept);
* a byte-level pre-tokenizer (``add_prefix_space=False``) and byte-level decoder: every UTF-8 byte is in
  the initial alphabet, so no character (emoji, CJK, ...) ever becomes ``<unk>`` and spacing is kept;
* a post-processor that appends ``</s>`` to every sequence (source and target); there is no ``<s>``
  prefix: the model shifts labels right with ``decoder_start_token_id = <s>``.

Special tokens and ids are fixed: ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3.
Known limit: a literal special-token string in the input (e.g. the text ``"</s>"``) is matched as that
special token and dropped by ``skip_special_tokens=True``.

A saved tokenizer names ``PreTrainedTokenizerFast`` as its class (this one adds no behaviour to it), so
``AutoTokenizer.from_pretrained(folder)`` loads it without ``vaswani`` and without remote code. Folders saved
before name ``VaswaniTokenizer`` with this file beside them; they load as before (``trust_remote_code=True``
where ``vaswani`` is not installed), which is why this file imports only the standard library, ``tokenizers``
and ``transformers``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import TokenizersBackend

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
#: The special tokens in id order: ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
#: Size of the byte-level alphabet every trained vocabulary contains.
BYTE_ALPHABET_SIZE = len(pre_tokenizers.ByteLevel.alphabet())
#: The smallest vocabulary that can be trained: the special tokens plus the 256 byte symbols.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
DEFAULT_MODEL_MAX_LENGTH = 1024


class VaswaniTokenizerFast(TokenizersBackend):
    """Shared source/target byte-level BPE tokenizer of the Transformer (§5.1).

    ``tokenizer(sources, text_target=targets)`` returns ``input_ids``, ``attention_mask`` and ``labels``;
    each sequence ends with ``</s>``. Build a new one with :func:`train_tokenizer`; load a saved one with
    ``AutoTokenizer.from_pretrained(folder)``.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args, **kwargs) -> tuple[str, ...]:
        """Save as a plain ``PreTrainedTokenizerFast``: everything is in ``tokenizer.json`` and the config, so
        ``AutoTokenizer`` needs neither this package nor remote code to load the folder."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = os.path.join(save_directory, "tokenizer_config.json")
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_file, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
        return files


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_from_backend(
    backend: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> VaswaniTokenizerFast:
    """Wrap a trained ``tokenizers.Tokenizer`` (special tokens at ids 0-3) as the transformers class."""
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != expected_id:
            raise ValueError(
                f"the backend tokenizer must have {token!r} at id {expected_id}, found "
                f"{backend.token_to_id(token)}; train it with vaswani.tokenization.train_tokenizer"
            )
    return VaswaniTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        add_bos_token=False,
        add_eos_token=True,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 37000,
    min_frequency: int = 2,
    *,
    length: int | None = None,
    show_progress: bool = True,
    output_dir: str | os.PathLike[str] | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> VaswaniTokenizerFast:
    """Train a byte-level BPE vocabulary on ``texts`` (source and target sentences together, §5.1).

    Args:
        texts: the sentences of both languages; pass source and target lines of the corpus together so that
            the vocabulary is shared.
        vocab_size: size of the vocabulary including the 4 special tokens and the 256 byte symbols
            (paper: ~37,000 for English-German). Must be at least :data:`MIN_VOCAB_SIZE`.
        min_frequency: a pair is merged only if it occurs at least this often.
        length: number of texts, for the progress bar (optional).
        show_progress: show the ``tokenizers`` trainer's progress bar.
        output_dir: if given, the tokenizer is saved there (``save_pretrained``).
        model_max_length: the ``model_max_length`` stored with the tokenizer.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the alphabet: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} entries ({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET_SIZE} bytes); "
            "choose a larger vocab_size"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"train_tokenizer expects strings, got {type(text).__name__}")
            if text:
                seen += 1
                yield text

    backend = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(counted(), trainer=trainer, length=length)
    if seen == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus: no non-empty text was given")
    tokenizer = tokenizer_from_backend(backend, model_max_length=model_max_length)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def check_tokenizer_folder(folder: str | os.PathLike[str]) -> None:
    """Raise a clear error if ``folder`` is not a saved tokenizer (missing ``tokenizer.json`` or config)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {os.fspath(folder)!r} does not exist")
    missing = [
        name
        for name in ("tokenizer.json", "tokenizer_config.json")
        if not os.path.isfile(os.path.join(folder, name))
    ]
    if missing:
        raise FileNotFoundError(
            f"tokenizer folder {os.fspath(folder)!r} lacks {', '.join(missing)}; save the tokenizer with "
            "save_pretrained() or train one with `vaswani tokenizer train`"
        )


def load_tokenizer(folder: str | os.PathLike[str], **kwargs) -> VaswaniTokenizerFast:
    """Load a saved tokenizer folder (offline), checking first that its files are there."""
    check_tokenizer_folder(folder)
    return VaswaniTokenizerFast.from_pretrained(os.fspath(folder), **kwargs)


__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "VaswaniTokenizerFast",
    "check_tokenizer_folder",
    "load_tokenizer",
    "tokenizer_from_backend",
    "train_tokenizer",
]
