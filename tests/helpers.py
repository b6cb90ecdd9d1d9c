"""Builders shared by the tests: the test sentence pairs, a tiny model and a padded batch."""

import os
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: 300 short English-German pairs written for the tests (line i of pairs.de translates line i of pairs.en).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Multi30k (task 1, raw) for the optional quality tests: the folder in $VASWANI_MULTI30K, else multi30k/ in the
#: repository (where the README's commands read it).
MULTI30K = Path(os.environ.get("VASWANI_MULTI30K", REPO_ROOT / "multi30k"))
#: ``vaswani`` with its command-line arguments, run as ``python -c KILLABLE_TRAIN train ...`` (or as a launched
#: script): the training process SIGKILLs itself at the end of update $KILL_AT (0: never), or with $KILL_WHEN=save
#: once that update's checkpoint is saved; with $KILL_RANK only that process of a group does.
KILLABLE_TRAIN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from vaswani.cli import main

    class KillAt(TrainerCallback):
        def kill(self, event, args, state):
            rank = os.environ.get("KILL_RANK")  # one process of a group, or any
            if (event == os.environ.get("KILL_WHEN", "step_end") and state.global_step == int(os.environ.get(
                    "KILL_AT", 0)) and rank in (None, str(args.process_index))):
                os.kill(os.getpid(), signal.SIGKILL)

        def on_step_end(self, args, state, control, **kwargs):
            self.kill("step_end", args, state)

        def on_save(self, args, state, control, **kwargs):
            self.kill("save", args, state)

    import vaswani.training.run as run
    original = run.VaswaniTrainer.__init__
    def with_killer(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), KillAt()]
        original(self, *args, **kwargs)
    run.VaswaniTrainer.__init__ = with_killer
    main(sys.argv[1:])
""")
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "train.en.gz").is_file(),
    reason=f"Multi30k not found in {MULTI30K}: put train.en.gz, train.de.gz etc. of github.com/multi30k/dataset "
    "(data/task1/raw) there, or point VASWANI_MULTI30K at such a folder",
)


def fixture_lines(lang: str) -> list[str]:
    """The ``lang`` side ("en" or "de") of the test sentence pairs."""
    return (FIXTURES / f"pairs.{lang}").read_text(encoding="utf-8").splitlines()


def tiny_config(**overrides):
    from vaswani import VaswaniConfig

    values = {
        "vocab_size": 97,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
    }
    values.update(overrides)
    return VaswaniConfig(**values)


def tiny_model(seed: int = 0, **overrides):
    from vaswani import VaswaniForConditionalGeneration

    torch.manual_seed(seed)
    return VaswaniForConditionalGeneration(tiny_config(**overrides)).eval()


def padded_batch(vocab_size: int = 97, lengths=(9, 6, 3), seed: int = 1, pad: int = 0, eos: int = 3):
    """Source ids with right padding and an attention mask; each row ends with </s>."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = torch.randint(4, vocab_size, (length - 1,), generator=generator)
        ids[row, length - 1] = eos
        mask[row, :length] = 1
    return ids, mask


def marian_tokenizer(folder: Path):
    """A MarianTokenizer from a SentencePiece model trained on the fixture pairs (Marian's layout:
    source/target.spm, vocab.json), as OPUS-MT checkpoints have."""
    import io
    import json

    import sentencepiece as spm
    from transformers import MarianTokenizer

    texts = fixture_lines("en") + fixture_lines("de")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=120, character_coverage=1.0,
        unk_id=1, bos_id=-1, eos_id=0, pad_id=-1, minloglevel=2,
    )
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"))


def save_small_marian(folder: Path, seed: int = 0) -> Path:
    """A small random MarianMTModel (OPUS-MT's choices: swish, scaled embeddings, [sin | cos] positions) with a
    real SentencePiece tokenizer, saved into ``folder``."""
    from transformers import MarianConfig, MarianMTModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = marian_tokenizer(folder)
    pad = tokenizer.pad_token_id
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        max_position_embeddings=128, activation_function="swish", scale_embedding=True,
    )
    marian = MarianMTModel(config).eval()
    with torch.no_grad():
        marian.final_logits_bias.normal_()
        marian.final_logits_bias[0, 0] += 3.0  # end sentences within a few tokens
    marian.generation_config.update(num_beams=4, max_length=40, bad_words_ids=[[pad]])
    marian.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
