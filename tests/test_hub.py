"""Uploads to a stand-in Hub on 127.0.0.1 (HF_ENDPOINT): exactly which files are sent, their bytes, the card,
and that what was sent loads with trust_remote_code in a fresh process without the package."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from fake_hub import FakeHub
from translation_helpers import make_model_folder, run_without_package

from vaswani.hub import CardInfo, files_to_upload, model_card

#: none for tokenizers; modeling.py's siblings travel as its relative imports, pipeline.py as custom_pipelines names it
CODE_FILES = {
    "configuration.py", "modeling.py", "unpadded.py", "losses.py", "perf.py", "generation.py", "decoding.py",
    "pipeline.py",
}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = make_model_folder(tmp_path_factory.mktemp("model"))
    (folder / "optimizer.pt").write_bytes(b"not for the hub")
    (folder / "checkpoint-100").mkdir()
    (folder / "my_notes.py").write_text('HF_TOKEN = "hf_secret"\n')  # stray files: neither model nor its code
    (folder / "x.safetensors").write_bytes(b"not the model")
    return folder


def _hub_env(hub: FakeHub) -> dict:
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token",
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def _load_uploaded(files: dict[str, bytes], target, tmp_path) -> list[list[int]]:
    """Write the uploaded files to a folder, then translate a probe there without the package."""
    target.mkdir()
    for name, content in files.items():
        (target / name).write_bytes(content)
    out = run_without_package(
        f"""
        import json
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(target)!r}, trust_remote_code=True)
        model = AutoModelForSeq2SeqLM.from_pretrained({str(target)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules")
        batch = tok(["Two dogs play.", "A man."], return_tensors="pt", padding=True)
        print(json.dumps(model.generate(**batch).tolist()))
        """,
        tmp_path,
    )
    return json.loads(out.strip().splitlines()[-1])


def _expected(folder) -> list[list[int]]:
    from vaswani.translate import load_translation_model

    model, tok = load_translation_model(folder)
    return model.generate(**tok(["Two dogs play.", "A man."], return_tensors="pt", padding=True)).tolist()


def test_files_to_upload_is_an_allow_list(folder, tmp_path):
    assert {p.name for p in files_to_upload(folder)} == MODEL_FILES | CODE_FILES
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        files_to_upload(tmp_path)
    partial = tmp_path / "partial"  # the code modeling.py imports is missing: trust_remote_code would fail
    partial.mkdir()
    for path in files_to_upload(folder):
        if path.name != "decoding.py":
            (partial / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="lacks decoding.py"):
        files_to_upload(partial)


def test_vaswani_push_sends_exactly_the_model_files_and_a_card(folder, tmp_path):
    with FakeHub() as hub:
        result = subprocess.run(
            [sys.executable, "-m", "vaswani", "push", str(folder), "me/vaswani-tiny", "--private",
             "--source-lang", "en", "--target-lang", "de", "--dataset", "bentrevett/multi30k",
             "--test-set", "Multi30k test_2016_flickr", "--bleu", "36.66"],
            capture_output=True, text=True, env=_hub_env(hub), timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    listed = result.stdout.split("\n", 1)[0]
    assert listed.startswith("uploading to me/vaswani-tiny: ") and "model.safetensors" in listed
    assert "my_notes.py" not in listed and "x.safetensors" not in listed
    assert hub.created == [{"name": "vaswani-tiny", "organization": "me", "visibility": "private"}]
    sent = hub.files["me/vaswani-tiny"]
    assert set(sent) == MODEL_FILES | CODE_FILES | {"README.md"}
    for name in MODEL_FILES | CODE_FILES:
        assert sent[name] == (folder / name).read_bytes(), name
    card = sent["README.md"].decode()
    header = card.split("---")[1]
    for line in ("- en", "- de", "license: apache-2.0", "- bentrevett/multi30k", "pipeline_tag: translation",
                 "type: bleu", "value: 36.66", "name: Multi30k test_2016_flickr"):
        assert line in header, line
    assert "trust_remote_code=True" in card and "vaswani translate me/vaswani-tiny" in card
    assert "GNMT length penalty" in card
    assert _load_uploaded(sent, tmp_path / "downloaded", tmp_path) == _expected(folder)


def test_model_and_tokenizer_push_to_hub(folder, tmp_path):
    script = textwrap.dedent(f"""
        from vaswani.translate import load_translation_model
        model, tok = load_translation_model({str(folder)!r})
        model.push_to_hub("me/pushed", commit_message="model")
        tok.push_to_hub("me/pushed", commit_message="tokenizer")
    """)
    with FakeHub() as hub:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                env=_hub_env(hub), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    sent = hub.files["me/pushed"]
    assert MODEL_FILES | CODE_FILES <= set(sent), sorted(sent)
    assert [commit["summary"] for commit in hub.commits] == ["model", "tokenizer"]
    assert _load_uploaded(sent, tmp_path / "downloaded", tmp_path) == _expected(folder)


def test_card_takes_recipe_from_training_run(folder, tmp_path):
    run = {"settings": {"preset": "multi30k", "max_tokens": 4096, "warmup_steps": 4000, "max_steps": -1},
           "result": {"steps": 5670, "eval_metrics": {"eval_bleu": 35.1}}}
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "vaswani_run.json").write_text(json.dumps(run))
    card = model_card(tmp_path, "me/x", CardInfo(source_lang="en", target_lang="de"))
    assert "| preset | multi30k |" in card and "| steps | 5670 |" in card and "max_steps" not in card
    assert "value: 35.1" in card
