"""Bad input and faults: each gives a one-line message naming the problem and the fix (exit status 2 from the CLI,
130 for Ctrl-C), never a traceback, an index error deep in torch or a silently wrong result."""

import argparse
import dataclasses
import gzip
import io
import json
import os
import sys
import time

import pytest
import torch
from helpers import padded_batch, tiny_config, tiny_model

from vaswani.cli import main
from vaswani.training.data import read_lines

WORDS = "a man dog runs sits on the street red blue big house park woman child plays ball".split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random model and a BPE learnt from a few made-up sentences (no files outside the repository)."""
    from vaswani import VaswaniForConditionalGeneration
    from vaswani.tokenization import train_tokenizer

    texts = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 7)) for i in range(60)]
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=2, show_progress=False)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         decoder_start_token_id=2)
    torch.manual_seed(0)
    model = VaswaniForConditionalGeneration(config).eval()
    model.generation_config.max_len_a, model.generation_config.max_len_b = 0.0, 4
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _error_of(argv, capsys, status=2):
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _copy(folder, destination):
    destination.mkdir()
    for item in folder.iterdir():
        (destination / item.name).write_bytes(item.read_bytes())
    return destination


# ---- corpus files ----


def test_byte_order_mark_is_not_part_of_the_first_sentence(tmp_path):
    plain, packed = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_bytes(b"\xef\xbb\xbfHello.\nWorld.\n")
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert list(read_lines(plain)) == list(read_lines(packed)) == ["Hello.", "World."]


def test_byte_order_mark_on_stdin_is_dropped(monkeypatch):
    from vaswani.cli.translation import _read_input

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfHello.\n")))
    assert _read_input(argparse.Namespace(text=[], input=None)) == ["Hello."]


def test_truncated_gz_corpus_names_the_file(tmp_path, capsys):
    data = gzip.compress("".join(f"sentence number {i} of many\n" for i in range(2000)).encode())
    cut = tmp_path / "cut.en.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.en.gz is truncated or damaged"):
        list(read_lines(cut))
    message = _error_of(["tokenizer", "train", "--source", cut, "--target", cut, "--output", tmp_path / "bpe"], capsys)
    assert "cut.en.gz is truncated" in message


def test_plain_text_named_gz_says_so(tmp_path):
    fake = tmp_path / "plain.gz"
    fake.write_text("not compressed\n")
    with pytest.raises(ValueError, match="is not gzip-compressed.*rename it without .gz"):
        list(read_lines(fake))


def test_truncated_gz_input_of_translate(folder, tmp_path, capsys):
    data = gzip.compress("".join(f"a man {i}\n" for i in range(3000)).encode())
    cut = tmp_path / "in.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert "in.gz is truncated or damaged" in _error_of(["translate", folder, "-i", cut], capsys)


# ---- translate arguments and model folders ----


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--beam", "0", "num_beams (--beam) must be >= 1, got 0"),
    ("--max-len-b", "-5", "max_len_b (--max-len-b) must be >= 0, got -5"),
    ("--max-len-a", "-1", "max_len_a (--max-len-a) must be >= 0, got -1.0"),
])
def test_bad_generation_options_are_refused(folder, capsys, option, value, expected):
    assert expected in _error_of(["translate", folder, "a man", option, value], capsys)


def test_unavailable_device_is_refused(folder, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "sees no CUDA GPU" in _error_of(["translate", folder, "a man", "--device", "cuda"], capsys)
    assert "not a torch device" in _error_of(["translate", folder, "a man", "--device", "gpu0"], capsys)


def test_output_into_missing_folder_is_refused_before_loading(tmp_path, capsys):
    # the model does not even exist: the output is checked first
    message = _error_of(["translate", tmp_path / "no-model", "a man", "-o", tmp_path / "missing" / "out.txt"], capsys)
    assert "missing does not exist" in message


@pytest.mark.parametrize("name", ["./nope", "../nope", "~/nope-vaswani-test", "some/deep/path"])
def test_missing_local_folder_says_no_such_folder(capsys, name):
    message = _error_of(["translate", name, "a man"], capsys)
    assert f"no such folder: {name}" in message and "Hub" not in message


@pytest.mark.parametrize("size", [7, 5000, -100])
def test_truncated_weights_name_the_file(folder, tmp_path, capsys, size):
    broken = _copy(folder, tmp_path / "broken")
    weights = broken / "model.safetensors"
    os.truncate(weights, size if size > 0 else weights.stat().st_size + size)
    message = _error_of(["translate", broken, "a man"], capsys)
    assert f"{weights} is truncated or damaged" in message
    message = _error_of(["attention", broken, "a man", "--output", tmp_path / "pictures"], capsys)
    assert f"{weights} is truncated or damaged" in message


def test_truncated_weights_in_any_command_give_a_message(folder, tmp_path, capsys):
    broken = _copy(folder, tmp_path / "broken")
    os.truncate(broken / "model.safetensors", 5000)
    message = _error_of(["average", broken, folder, "--output", tmp_path / "averaged", "--force"], capsys)
    assert "a .safetensors weights file is truncated or damaged" in message


def test_unknown_model_type_is_named_without_a_prompt(folder, tmp_path, capsys, monkeypatch):
    other = _copy(folder, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("asked whether to run the folder's code"))
    assert "model_type 'no-such-model'" in _error_of(["translate", other, "a man"], capsys)


def test_ctrl_c_in_translate_exits_130_with_a_line(folder, capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vaswani.translate.translate", interrupted)
    message = _error_of(["translate", folder, "a man", "-o", tmp_path / "out.txt"], capsys, status=130)
    assert "interrupted; nothing was written to" in message


# ---- model inputs ----


@pytest.mark.parametrize("bad", [97, -5, -101])
def test_labels_outside_the_vocabulary_are_refused(model, bad):
    ids, mask = padded_batch()
    labels = ids.clone()
    labels[0, 1] = bad
    with pytest.raises(ValueError, match=f"labels contain {bad}, which is neither a token id"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_length_is_refused(model, shape):
    ids = torch.full(shape, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="no sentences or no tokens"):
        model(input_ids=ids, decoder_input_ids=torch.full((shape[0], 2), 5))
    with pytest.raises(ValueError, match="no sentences or no tokens"):
        model.generate(input_ids=ids, max_new_tokens=3)


def test_one_dimensional_input_ids_are_refused(model):
    with pytest.raises(ValueError, match=r"input_ids has shape \(5,\) but must be \[batch, length\]"):
        model(input_ids=torch.arange(4, 9), decoder_input_ids=torch.arange(4, 7)[None])


def test_all_labels_ignored_gives_zero_loss_that_backpropagates():
    model = tiny_model().train()
    ids, mask = padded_batch()
    labels = torch.full_like(ids, -100)
    for skip_logits in (False, True):
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, skip_logits=skip_logits,
                     num_items_in_batch=torch.tensor(0)).loss
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_additive_float_mask_means_what_the_keep_mask_means(model):
    ids, mask = padded_batch()
    additive = torch.zeros(mask.shape).masked_fill(mask == 0, float("-inf"))
    decoder_ids = ids[:, :4]
    expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    for float_mask in (additive, additive.clamp(min=-1e9), mask.float()):
        got = model(input_ids=ids, attention_mask=float_mask, decoder_input_ids=decoder_ids).logits
        torch.testing.assert_close(got, expected)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=additive, max_new_tokens=4, num_beams=2),
                       generated)


def test_nan_in_inputs_embeds_is_refused(model):
    embeds = torch.randn(2, 5, 32)
    embeds[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs_embeds contains NaN or inf"):
        model(inputs_embeds=embeds, decoder_input_ids=torch.full((2, 3), 5))


# ---- training ----


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from vaswani.demo.numbers import make_number_corpus, write_parallel_corpus

    out = tmp_path_factory.mktemp("numbers")
    write_parallel_corpus(make_number_corpus(120, 8, 8, seed=1, max_value=999), out)
    yield {"source": out / "train.en", "target": out / "train.de"}
    torch.set_flush_denormal(False)  # training here flushed denormals for the whole process (tune_cpu_training)


def _settings(output, corpus, **overrides):
    from transformers import Seq2SeqTrainingArguments

    from vaswani.training.run import TrainSettings, recipe_arguments

    arguments = dict(max_steps=3, warmup_steps=10, save_steps=3, disable_tqdm=True)
    values = dict(train_corpus=corpus, preset="tiny", vocab_size=300, max_tokens=400,
                  config_overrides={"d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64})
    names = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    for key, value in overrides.items():
        (arguments if key in names else values)[key] = value
    return TrainSettings(args=recipe_arguments(output, **arguments), **values)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus):
    from vaswani.training.run import train

    output = tmp_path_factory.mktemp("run") / "out"
    train(_settings(output, corpus))
    return output


def test_warmup_steps_zero_is_refused_before_reading_the_corpus(tmp_path):
    missing = {"source": tmp_path / "none.en", "target": tmp_path / "none.de"}
    from vaswani.training.run import train

    with pytest.raises(ValueError, match="--warmup-steps must be > 0"):
        train(_settings(tmp_path / "out", missing, warmup_steps=0))


def test_resume_with_another_model_is_refused_naming_the_difference(trained_run, corpus):
    from vaswani.training.run import train

    other = _settings(trained_run, corpus, resume=True, max_steps=6,
                      config_overrides={"d_model": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64})
    with pytest.raises(ValueError, match="checkpoint-3 was trained with another model config .*d_model=32 there but "
                                         "64 now"):
        train(other)


def test_ctrl_c_in_train_says_where_to_continue(trained_run, corpus, capsys, monkeypatch, tmp_path):
    from vaswani.training.trainer import VaswaniTrainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(VaswaniTrainer, "train", interrupted)
    argv = ["train", "--source", corpus["source"], "--target", corpus["target"], "--output", trained_run, "--resume",
            "--preset", "tiny", "--set", "d_model=32", "encoder_ffn_dim=64", "decoder_ffn_dim=64", "--max-steps", "6",
            "--report-to", "none", "--no-progress", "--eval-steps", "0"]
    message = _error_of(argv, capsys, status=130)
    assert f"interrupted; the last complete checkpoint is {trained_run / 'checkpoint-3'}; continue from it with " \
           "--resume" in message


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_full_disk_names_the_disk_and_the_last_checkpoint(trained_run, error):
    from vaswani.training.trainer import explained_stops

    with pytest.raises(OSError, match=f"the disk holding {trained_run} is full .* the last complete checkpoint is "
                                      f"{trained_run / 'checkpoint-3'}"):
        with explained_stops(trained_run):
            raise error


def test_sigterm_says_where_to_resume_once(trained_run):
    import signal

    from vaswani.training.trainer import explained_stops

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as info, explained_stops(trained_run):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode; the sleep only bounds a failure
    assert str(info.value).startswith("stopped by SIGTERM") and str(info.value).count("last complete checkpoint") == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_while_a_lost_process_is_explained_still_says_where_to_resume(trained_run, monkeypatch):
    """A launcher sends SIGTERM to the survivors of a lost process; it may land while that loss is being explained."""
    import signal

    from vaswani.training import trainer

    def lost_and_terminated(err: BaseException) -> bool:
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    monkeypatch.setattr(trainer, "_lost_peer", lost_and_terminated)
    with pytest.raises(KeyboardInterrupt, match=f"stopped by SIGTERM .*the last complete checkpoint is "
                                                f"{trained_run / 'checkpoint-3'}"):
        with trainer.explained_stops(trained_run):
            raise RuntimeError("Connection closed by peer")


def test_stop_before_the_first_checkpoint_says_to_start_again(tmp_path):
    from vaswani.training.trainer import explained_stops, resume_hint

    assert resume_hint(tmp_path) == f"no checkpoint yet in {tmp_path}; start again with --overwrite"
    with pytest.raises(KeyboardInterrupt, match="no checkpoint yet"), explained_stops(tmp_path):
        raise KeyboardInterrupt
