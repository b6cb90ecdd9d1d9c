"""``vaswani push``, ``vaswani convert marian`` and ``vaswani export marian|ctranslate2``: models in and out."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import printing_notes


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub with a generated model card")
    p.add_argument("model_dir", type=Path, help="saved model folder (weights, config, tokenizer, code)")
    p.add_argument("repo_id", help="Hub repository, e.g. your-name/vaswani-multi30k-en-de")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--source-lang", help="source language code for the card, e.g. en (default: not stated)")
    p.add_argument("--target-lang", help="target language code for the card, e.g. de (default: not stated)")
    p.add_argument(
        "--dataset", help="training data as a Hub dataset id, e.g. bentrevett/multi30k (default: not stated)"
    )
    p.add_argument(
        "--test-set",
        help="name of the test set the BLEU score is on, e.g. 'Multi30k test_2016_flickr' (default: not stated)",
    )
    p.add_argument("--bleu", type=float, help="test BLEU for the card (default: validation BLEU of `vaswani train`)")
    p.add_argument("--license", default="apache-2.0", help="license of the weights")
    p.add_argument("--message", default="Upload Vaswani Transformer model", help="commit message")
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> None:
    from ..hub import CardInfo, files_to_upload, push_model_folder

    names = [path.name for path in files_to_upload(args.model_dir)] + ["README.md (generated model card)"]
    print(f"uploading to {args.repo_id}: {', '.join(names)}", flush=True)
    info = CardInfo(
        source_lang=args.source_lang,
        target_lang=args.target_lang,
        dataset=args.dataset,
        dataset_name=args.test_set,
        bleu=args.bleu,
        license=args.license,
    )
    try:
        url = push_model_folder(
            args.model_dir,
            args.repo_id,
            info=info,
            private=args.private,
            token=args.token,
            commit_message=args.message,
        )
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # network and Hub errors come in many types (httpx, huggingface_hub)
        raise ValueError(
            f"could not upload {args.model_dir} to {args.repo_id!r} ({type(err).__name__}: {err}); check the "
            "network (HF_ENDPOINT) and the token (--token, HF_TOKEN or `hf auth login`)."
        ) from err
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert pretrained checkpoints into Vaswani model folders")
    csub = p.add_subparsers(dest="convert_command", required=True)
    m = csub.add_parser("marian", help="an OPUS-MT / MarianMTModel checkpoint and its tokenizer → a Vaswani folder")
    m.add_argument("source", help="MarianMTModel folder or Hub id (e.g. Helsinki-NLP/opus-mt-en-de)")
    m.add_argument("output", help="new folder for the Vaswani model")
    m.set_defaults(func=_run_convert_marian)


def _run_convert_marian(args: argparse.Namespace) -> None:
    from ..convert import convert_marian_checkpoint

    model = convert_marian_checkpoint(args.source, args.output)
    print(f"converted {args.source} ({model.num_parameters():,} parameters) into {args.output}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a Vaswani model folder for other engines")
    esub = p.add_subparsers(dest="export_command", required=True)
    _export_parser(
        esub,
        "marian",
        "a Vaswani folder → a MarianMTModel folder that plain transformers loads (no remote code)",
        "new folder for the MarianMTModel and its tokenizer",
    ).set_defaults(func=_run_export_marian)
    c = _export_parser(
        esub,
        "ctranslate2",
        "a Vaswani folder → a CTranslate2 model folder with its tokenizer (needs vaswani[ct2])",
        "new folder for the CTranslate2 model, its tokenizer and decoding settings",
    )
    c.add_argument(
        "--quantization",
        default="float32",
        choices=["float32", "int8", "int8_float32", "bfloat16"],
        help="weight type (default float32); int8 is the fastest on CPUs",
    )
    c.set_defaults(func=_run_export_ctranslate2)
    _export_parser(
        esub,
        "onnx",
        "a Vaswani folder → encoder and decoder ONNX graphs with its tokenizer (needs vaswani[onnx])",
        "new folder for the ONNX graphs, the Marian config and the tokenizer",
    ).set_defaults(func=_run_export_onnx)


def _export_parser(esub: argparse._SubParsersAction, name: str, about: str, output: str) -> argparse.ArgumentParser:
    """An ``export`` sub-command with what every export takes: the model, the output folder, ``--overwrite``."""
    p = esub.add_parser(name, help=about)
    p.add_argument("model", help="Vaswani model folder (with its tokenizer) or Hub id")
    p.add_argument("output", help=output)
    p.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    return p


def _run_export_marian(args: argparse.Namespace) -> None:
    from ..convert import export_marian

    marian = printing_notes(lambda: export_marian(args.model, args.output, overwrite=args.overwrite))
    print(f"exported {args.model} ({marian.num_parameters():,} parameters) as a MarianMTModel into {args.output}")


def _run_export_ctranslate2(args: argparse.Namespace) -> None:
    from ..ct2 import export_ctranslate2

    settings = printing_notes(
        lambda: export_ctranslate2(args.model, args.output, args.quantization, overwrite=args.overwrite)
    )
    print(
        f"exported {args.model} as a CTranslate2 model ({args.quantization}) into {args.output}; decoding: "
        + ", ".join(f"{key}={value}" for key, value in settings.items())
    )


def _run_export_onnx(args: argparse.Namespace) -> None:
    from ..onnx_export import DECODER_FILE, ENCODER_FILE, export_onnx

    printing_notes(lambda: export_onnx(args.model, args.output, overwrite=args.overwrite))
    print(f"exported {args.model} as ONNX ({ENCODER_FILE}, {DECODER_FILE}) into {args.output}")


COMMANDS = [_add_push, _add_convert, _add_export]
