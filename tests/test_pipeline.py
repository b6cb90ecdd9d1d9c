"""pipeline("translation") / pipeline("text2text-generation") with and without the package installed."""

import json

import pytest
from transformers import pipeline
from translation_helpers import make_model_folder, run_without_package

from vaswani.translate import load_translation_model, translate

INPUTS = ["Two dogs play in the snow.", "", "A man is riding a bicycle."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def expected(folder):
    model, tokenizer = load_translation_model(folder)
    return translate(model, tokenizer, INPUTS)


def test_saved_folder_declares_the_pipelines(folder):
    config = json.loads((folder / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"translation", "text2text-generation"}
    assert config["custom_pipelines"]["translation"]["impl"] == "pipeline.VaswaniTranslationPipeline"
    assert (folder / "pipeline.py").is_file()


def test_pipelines_with_the_package(folder, expected):
    model, tokenizer = load_translation_model(folder)
    translator = pipeline("translation", model=model, tokenizer=tokenizer)
    assert [out[0]["translation_text"] for out in translator(INPUTS, batch_size=2)] == expected
    generator = pipeline("text2text-generation", model=model, tokenizer=tokenizer)
    assert generator(INPUTS[0]) == [{"generated_text": expected[0]}]
    from_folder = pipeline("translation", model=str(folder), trust_remote_code=True)
    assert from_folder(INPUTS[2]) == [{"translation_text": expected[2]}]


@pytest.mark.parametrize("task", ["translation_en_to_de", "translation_de_to_en", "translation_en_to_fr"])
def test_language_pair_task_names_resolve_to_translation(folder, expected, task):
    model, tokenizer = load_translation_model(folder)
    translator = pipeline(task, model=model, tokenizer=tokenizer)
    assert translator(INPUTS[0]) == [{"translation_text": expected[0]}]


def test_other_unknown_tasks_stay_unknown(folder):
    model, tokenizer = load_translation_model(folder)
    with pytest.raises(KeyError, match="Unknown task translation_en"):
        pipeline("translation_en", model=model, tokenizer=tokenizer)


def test_generate_options_per_call_and_at_construction(folder):
    model, tokenizer = load_translation_model(folder)
    translator = pipeline("translation", model=model, tokenizer=tokenizer, num_beams=1, max_len_b=3)
    short = translator(INPUTS[0], max_len_a=0.0)[0]["translation_text"]
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2  # 3 tokens, the last one </s>


def test_pipelines_through_remote_code_without_the_package(folder, expected, tmp_path):
    out = run_without_package(
        f"""
        import json
        from transformers import pipeline
        translator = pipeline("translation", model={str(folder)!r}, trust_remote_code=True)
        assert type(translator).__module__.startswith("transformers_modules"), type(translator).__module__
        texts = [out[0]["translation_text"] for out in translator({INPUTS!r})]
        generated = pipeline("text2text-generation", model={str(folder)!r}, trust_remote_code=True)({INPUTS[0]!r})
        print(json.dumps([texts, generated]))
        """,
        tmp_path,
    )
    texts, generated = json.loads(out.strip().splitlines()[-1])
    assert texts == expected
    assert generated == [{"generated_text": expected[0]}]
