"""Fine-tuning as transformers users do it: the stock Seq2SeqTrainer on a Vaswani model (eval_loss, best model,
early stopping, label_smoothing_factor), `vaswani train` on HfArgumentParser with a run file, --init-from a
Vaswani or Marian checkpoint, the fine-tuning schedules, chrF and `vaswani score`, and the refusals."""

import dataclasses
import json
import shutil

import pytest
import torch
from helpers import FIXTURES, fixture_lines, save_small_marian
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    EarlyStoppingCallback,
    MarianMTModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)
from transformers.utils import find_labels

from vaswani import VaswaniForConditionalGeneration
from vaswani.cli import main
from vaswani.convert import marian_to_vaswani
from vaswani.training.data import load_parallel_corpus, tokenize_corpus
from vaswani.training.trainer import VaswaniTrainer, seq2seq_collator

PAIRS = ["--source", str(FIXTURES / "pairs.en"), "--target", str(FIXTURES / "pairs.de")]
SHAPE = ["--set", "d_model=32", "encoder_layers=1", "decoder_layers=1", "encoder_ffn_dim=64", "decoder_ffn_dim=64",
         "encoder_attention_heads=2", "decoder_attention_heads=2"]
QUICK = ["--max-tokens", "400", "--warmup-steps", "4", "--logging-steps", "1", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module", autouse=True)
def _denormals_back():
    yield
    torch.set_flush_denormal(False)  # training here flushed denormals for the whole process (tune_cpu_training)


def cli(argv) -> None:
    main([str(a) for a in argv])


def _exit_status(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli(argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A tiny model trained from scratch on the fixture pairs by `vaswani train` (the source to fine-tune)."""
    out = tmp_path_factory.mktemp("scratch") / "model"
    cli(["train", *PAIRS, "--output", str(out), "--preset", "tiny", *SHAPE, "--vocab-size", "300", *QUICK,
          "--max-steps", "4", "--save-steps", "4"])
    return out


@pytest.fixture(scope="module")
def pairs(scratch):
    """The fixture pairs tokenized with the scratch model's tokenizer; the model itself."""
    tokenizer = AutoTokenizer.from_pretrained(scratch)
    corpus, _ = load_parallel_corpus(source=FIXTURES / "pairs.en", target=FIXTURES / "pairs.de")
    data, _ = tokenize_corpus(corpus, tokenizer)
    return data, tokenizer


def _stock_args(tmp_path, **fields) -> Seq2SeqTrainingArguments:
    values = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=16,
                  per_device_eval_batch_size=32, disable_tqdm=True, save_strategy="no")
    return Seq2SeqTrainingArguments(**{**values, **fields})


def test_the_stock_trainer_finds_only_labels():
    assert find_labels(VaswaniForConditionalGeneration) == ["labels"]


def test_stock_trainer_evaluates_and_stops_early_on_eval_loss(scratch, pairs, tmp_path):
    data, tokenizer = pairs
    model = VaswaniForConditionalGeneration.from_pretrained(scratch)
    args = _stock_args(tmp_path, max_steps=20, learning_rate=0.0, eval_strategy="steps", eval_steps=1,
                       save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", greater_is_better=False)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(40)),
                             data_collator=seq2seq_collator(tokenizer, model), processing_class=tokenizer,
                             callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    assert trainer.label_names == ["labels"]
    assert "eval_loss" in trainer.evaluate()
    trainer.train()
    # learning rate 0: the loss never improves on the first evaluation, so patience 2 stops after step 3
    assert trainer.state.global_step == 3
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")


def test_label_smoothing_factor_means_the_same_in_both_trainers(scratch, pairs, tmp_path):
    """The stock Trainer's LabelSmoother and VaswaniTrainer (ε to the model's own loss) give one loss; both
    train without KeyError: 'logits'."""
    data, tokenizer = pairs
    model = VaswaniForConditionalGeneration.from_pretrained(scratch)
    collate = seq2seq_collator(tokenizer, model)
    batch = collate([data[i] for i in range(8)])
    losses = []
    for trainer_class in (Seq2SeqTrainer, VaswaniTrainer):
        args = _stock_args(tmp_path / trainer_class.__name__, max_steps=2, label_smoothing_factor=0.1, warmup_steps=1)
        trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=collate,
                                processing_class=tokenizer)
        model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, dict(batch)))
        assert trainer.train().training_loss > 0
        model = VaswaniForConditionalGeneration.from_pretrained(scratch)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        unsmoothed = model.eval()(**batch).loss
    assert not torch.isclose(losses[1], unsmoothed)


def test_fine_tuning_a_vaswani_model_from_the_command_line(scratch, tmp_path, capsys):
    out = tmp_path / "tuned"
    run_file = tmp_path / "run.yaml"
    run_file.write_text("max_steps: 9\nlearning_rate: 0.0001\nlr_schedule: constant\nsave_steps: 3\nseed: 5\n")
    cli(["train", *PAIRS, "--output", out, "--init-from", scratch, "--config", run_file, "--max-steps", "3",
          "--set", "dropout=0.0", *QUICK])
    record = json.loads((out / "vaswani_run.json").read_text())
    settings = record["settings"]
    assert settings["max_steps"] == 3  # the flag over the file
    assert (settings["learning_rate"], settings["lr_schedule"], settings["seed"]) == (1e-4, "constant", 1)
    assert settings["init_from"] == str(scratch) and settings["report_to"] == []
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates == pytest.approx([0.25e-4, 0.5e-4, 0.75e-4])  # the warm-up of 4 updates towards 1e-4
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert model.config.dropout == 0.0 and model.config.d_model == 32
    source_vocab = AutoTokenizer.from_pretrained(scratch).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == source_vocab
    capsys.readouterr()
    cli(["translate", str(out), "two dogs", "--beam", "1"])
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_the_first_update_starts_from_the_checkpoint(scratch, tmp_path):
    from transformers import TrainerCallback

    from vaswani.training.run import TrainSettings, recipe_arguments, train

    seen = {}

    class FirstWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.update({k: v.clone() for k, v in model.state_dict().items()})

    settings = TrainSettings(
        args=recipe_arguments(tmp_path / "tuned", max_steps=1, learning_rate=1e-4, warmup_steps=1, disable_tqdm=True),
        train_corpus={"source": FIXTURES / "pairs.en", "target": FIXTURES / "pairs.de"},
        init_from=str(scratch),
        lr_schedule="inverse_sqrt",
        max_tokens=400,
    )
    train(settings, callbacks=[FirstWeights()])
    source = VaswaniForConditionalGeneration.from_pretrained(scratch).state_dict()
    assert seen.keys() == source.keys()
    assert all(torch.equal(seen[key], source[key]) for key in source)


def test_fine_tuning_a_marian_checkpoint_keeps_its_tokenizer(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    marian = save_small_marian(tmp_path / "marian")
    out = tmp_path / "tuned"
    cli(["train", *PAIRS, "--output", out, "--init-from", marian, "--max-steps", "2", "--learning-rate", "1e-3",
          "--lr-schedule", "inverse_sqrt", *QUICK])
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(model).__name__ == "VaswaniForConditionalGeneration"
    assert model.config.sinusoid_layout == "concatenated" and model.config.lm_head_bias
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(tokenizer).__name__ == "MarianTokenizer"
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(marian).get_vocab()
    before = marian_to_vaswani(MarianMTModel.from_pretrained(marian)).state_dict()
    after = model.state_dict()
    assert not torch.equal(before["model.shared.weight"], after["model.shared.weight"])
    capsys.readouterr()
    cli(["translate", str(out), fixture_lines("en")[0]])
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_patience_keeps_the_best_checkpoint_beside_the_average(scratch, tmp_path):
    out = tmp_path / "tuned"
    cli(["train", *PAIRS, "--valid-source", FIXTURES / "pairs.en", "--valid-target", FIXTURES / "pairs.de",
          "--eval-max-sentences", "8", "--eval-beams", "1", "--output", out, "--init-from", scratch,
          "--lr-schedule", "constant", "--learning-rate", "1e-4", "--max-steps", "4", "--eval-steps", "2",
          "--save-steps", "2", "--patience", "3", "--average-last", "2", *QUICK])
    result = json.loads((out / "vaswani_run.json").read_text())["result"]
    assert result["best_checkpoint"] in {str(out / "checkpoint-2"), str(out / "checkpoint-4")}
    assert {"eval_bleu", "eval_chrf", "eval_loss"} <= set(result["eval_metrics"])
    assert len(result["averaged_checkpoints"]) == 2
    assert AutoModelForSeq2SeqLM.from_pretrained(out / "best").config.d_model == 32


def test_every_training_argument_is_a_flag_and_defaults_are_the_recipe(tmp_path):
    from vaswani.cli.training import parse_train_args

    args, options = parse_train_args(["--output", str(tmp_path), "--bf16", "--gradient-checkpointing",
                                      "--torch_compile", "--dataloader-num-workers", "2", "--label-smoothing", "0.2",
                                      "--lr-scale", "2", "--epochs", "3", "--eval-beams", "2", "--no-progress"])
    assert args.bf16 and args.gradient_checkpointing and args.torch_compile and args.dataloader_num_workers == 2
    assert (args.label_smoothing_factor, args.learning_rate, args.num_train_epochs) == (0.2, 2.0, 3.0)
    assert args.generation_num_beams == 2 and args.disable_tqdm
    args, options = parse_train_args(["--output", str(tmp_path)])
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.max_grad_norm) == (1.0, 4000, 0.0, 0.0)
    assert args.report_to == [] and args.predict_with_generate and args.seed == 0
    assert options.lr_schedule == "noam" and options.preset is None


def test_train_help_lists_transformers_options(capsys):
    code, _ = _exit_status(["train", "--help"], capsys)
    assert code == 0


def test_options_of_our_own_say_their_default():
    from vaswani.cli.training import TrainOptions, train_parser

    parser = train_parser()
    names = {field.name for field in dataclasses.fields(TrainOptions)}
    for action in parser._actions:
        if action.dest in names and action.nargs != 0:
            assert "default" in parser.formatter_class(parser.prog)._get_help_string(action), action.option_strings


def test_bad_run_files_and_schedules_are_refused(tmp_path, capsys):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"max_steps": 3, "lerning_rate": 0.1}))
    code, err = _exit_status(["train", *PAIRS, "--output", tmp_path / "out", "--config", run_file], capsys)
    assert code == 2 and "unknown key 'lerning_rate'; did you mean 'learning_rate'" in err
    code, err = _exit_status(["train", *PAIRS, "--output", tmp_path / "out", "--lr-schedule", "constant"], capsys)
    assert code == 2 and "--learning-rate itself" in err and "5e-5" in err
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_refused_before_anything_is_written(scratch, tmp_path, capsys):
    out = tmp_path / "out"

    def refused(source, *extra):
        code, err = _exit_status(["train", *PAIRS, "--output", out, "--init-from", source, *extra, *QUICK], capsys)
        assert code == 2 and not out.exists(), err
        return err

    (tmp_path / "empty").mkdir()
    assert "no config.json there" in refused(tmp_path / "empty")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "a 'bert' checkpoint is not a seq2seq model" in refused(bert)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(scratch, no_weights, ignore=shutil.ignore_patterns("model.safetensors", "checkpoint-*"))
    assert "no weights there" in refused(no_weights) and "random weights" in refused(no_weights)
    cut = tmp_path / "cut"
    shutil.copytree(scratch, cut, ignore=shutil.ignore_patterns("checkpoint-*"))
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or damaged" in refused(cut)
    partial = tmp_path / "partial"
    shutil.copytree(scratch, partial, ignore=shutil.ignore_patterns("checkpoint-*"))
    from safetensors.torch import load_file, save_file

    weights = load_file(partial / "model.safetensors")
    del weights["model.encoder.layers.0.feed_forward.fc1.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    assert "do not fill the model" in refused(partial)
    assert "--preset base: d_model=512 but the checkpoint has 32" in refused(scratch, "--preset", "base")
    assert "--set d_model=64 but the checkpoint has 32" in refused(scratch, "--set", "d_model=64")
    other = tmp_path / "other_tokenizer"
    cli(["tokenizer", "train", "--source", FIXTURES / "pairs.de", "--target", FIXTURES / "pairs.en", "--output",
          other, "--vocab-size", "280"])
    assert "another vocabulary" in refused(scratch, "--tokenizer", other)


def test_score_prints_bleu_and_chrf_with_signatures(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("the cat sat on the mat\nhello world\n")
    ref.write_text("the cat sat on a mat\nhello world !\n")
    cli(["score", "--hyp", str(hyp), "--ref", str(ref)])
    bleu_line, chrf_line = capsys.readouterr().out.splitlines()
    assert bleu_line.startswith("BLEU = ") and "tok:13a" in bleu_line
    assert chrf_line.startswith("chrF = ") and "nc:6" in chrf_line
    ref.write_text("one line\n")
    code, err = _exit_status(["score", "--hyp", hyp, "--ref", ref], capsys)
    assert code == 2 and "line-aligned" in err
