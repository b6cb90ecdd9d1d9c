"""The command line itself: every option documented with its default, one meaning per flag name, --version."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from vaswani.cli import build_parser, installed_version, sub_parsers

PARSER = build_parser()
COMMANDS = sub_parsers(PARSER)
NO_HELP_NEEDED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if not isinstance(action, NO_HELP_NEEDED)]


@pytest.mark.parametrize("parser", COMMANDS, ids=[p.prog for p in COMMANDS])
def test_every_option_has_help_that_shows_its_default(parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    for action in _options(parser):
        assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help text"
        shown = parser.formatter_class(parser.prog)._get_help_string(action)
        if action.option_strings and action.nargs != 0 and not action.required:
            assert "default" in shown, f"{parser.prog} {action.option_strings} does not say its default"
    assert "(default: %(default)s)" not in text  # the formatter filled every default in


def test_a_flag_name_means_one_kind_of_thing_across_commands() -> None:
    """--output is a folder wherever it appears; the file output of translate has its own name."""
    for parser in COMMANDS:
        for action in _options(parser):
            if "--output" in action.option_strings:
                assert "file" not in action.help.split("(")[0] or "folder" in action.help, (parser.prog, action.help)
            if "--max-tokens" in action.option_strings:
                assert "batch" in action.help, (parser.prog, action.help)


def test_version() -> None:
    result = subprocess.run([sys.executable, "-m", "vaswani", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"vaswani {installed_version()}"


def test_help_imports_neither_torch_nor_transformers() -> None:
    """``vaswani --help`` answers at once: the package and its parser load without the heavy libraries."""
    code = (
        "import sys, contextlib, io\n"
        "from vaswani.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "heavy = sorted(name for name in ('torch', 'transformers') if name in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


AUTO = "from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer"
REGISTRATION_ORDERS = {
    "package first": f"import vaswani\n{AUTO}",
    "transformers first": f"{AUTO}\nimport vaswani",
    "model module first": f"import vaswani.modeling\n{AUTO}",
    "trainer first": f"import vaswani\nfrom transformers import Seq2SeqTrainer\n{AUTO}",
}


@pytest.mark.parametrize("imports", REGISTRATION_ORDERS.values(), ids=REGISTRATION_ORDERS)
def test_the_auto_classes_know_the_model_whatever_is_imported_first(imports: str) -> None:
    """Registration waits for transformers' registries, so no import order leaves one of them without the model."""
    code = imports + (
        "\nfrom transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "from vaswani.configuration import VaswaniConfig\n"
        "from vaswani.modeling import VaswaniForConditionalGeneration\n"
        "from vaswani.tokenization import VaswaniTokenizerFast\n"
        "assert type(AutoConfig.for_model('vaswani')) is VaswaniConfig\n"
        "assert AutoModelForSeq2SeqLM._model_mapping[VaswaniConfig] is VaswaniForConditionalGeneration\n"
        "assert TOKENIZER_MAPPING[VaswaniConfig] is VaswaniTokenizerFast\n"
        "assert 'translation' in PIPELINE_REGISTRY.get_supported_tasks()\n"
        "assert VaswaniForConditionalGeneration.saved_pipelines\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_translate_default_batch_is_the_librarys() -> None:
    from vaswani.cli import build_parser
    from vaswani.translate import DEFAULT_MAX_TOKENS

    assert build_parser().parse_args(["translate", "model"]).max_tokens == DEFAULT_MAX_TOKENS
