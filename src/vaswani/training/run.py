"""``vaswani train``: corpus → shared BPE → Transformer → trained, averaged model folder (§5, §6.1)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import (
    EarlyStoppingCallback,
    GenerationConfig,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    TrainerState,
)
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

from ..configuration import (
    PRESETS,
    VaswaniConfig,
    check_config_dict,
    check_known_keys,
    known_config_keys,
)
from ..generation import known_generation_keys
from ..modeling import VaswaniForConditionalGeneration
from ..perf import tune_cpu_training, warn_if_bf16_emulated
from ..tokenization import load_tokenizer
from .averaging import RunIdentity, average_checkpoints, collect_checkpoints, numbered_checkpoints
from .data import load_parallel_corpus, tokenize_corpus, train_tokenizer_from_corpus
from .finetune import check_tokenizer_matches, fine_tuning_config, load_source_model, load_source_tokenizer
from .metrics import make_compute_metrics
from .schedule import SCHEDULES
from .streaming import (
    DEFAULT_BUFFER_PAIRS,
    TokenBatchStream,
    check_stream_workers,
    corpus_identity,
    resume_position,
    stream_corpus,
)
from .trainer import (
    TimeBudget,
    VaswaniTrainer,
    check_resumable,
    explained_stops,
    gradient_accumulation_for,
    last_complete_checkpoint,
    resume_hint,
    seq2seq_collator,
)

RUN_FILE = "vaswani_run.json"
#: With ``patience`` (or ``load_best_model_at_end``) and averaging, the best checkpoint as a model folder of its own.
BEST_DIR = "best"

#: The recipe's ``Seq2SeqTrainingArguments`` where they differ from transformers' defaults: the learning rate is
#: the factor on the §5.3 schedule (1.0) with its 4,000 warm-up updates, Adam without weight decay or gradient
#: clipping, ε_ls = 0.1 (§5.4), validation BLEU with beam 4 (§6.1), and no experiment tracker unless asked for.
RECIPE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1.0,
    "warmup_steps": 4000,
    "weight_decay": 0.0,
    "max_grad_norm": 0.0,
    "label_smoothing_factor": 0.1,
    "num_train_epochs": 10.0,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "steps",
    "eval_steps": 500,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 5,
    "logging_steps": 50,
    "predict_with_generate": True,
    "generation_num_beams": 4,
    "seed": 0,
    "report_to": "none",
    "ddp_find_unused_parameters": False,
}


def device_defaults() -> dict[str, Any]:
    """Where the run trains: on the CPU unless there is a GPU (``use_cpu`` also makes CPU processes see each
    other under ``accelerate launch``), pinned memory only for CUDA."""
    return {"use_cpu": _trains_on_cpu(), "dataloader_pin_memory": torch.cuda.is_available()}


def recipe_arguments(output_dir: str | Path, **fields: Any) -> Seq2SeqTrainingArguments:
    """``Seq2SeqTrainingArguments`` with the recipe's defaults (:data:`RECIPE_DEFAULTS`); ``fields`` are any
    of its fields, e.g. ``max_steps=1000, bf16=True``."""
    return Seq2SeqTrainingArguments(output_dir=str(output_dir), **{**RECIPE_DEFAULTS, **device_defaults(), **fields})


@dataclass
class TrainSettings:
    """One training run: transformers' ``Seq2SeqTrainingArguments`` (``args``: steps, checkpoints, precision,
    logging, the learning rate, warm-up and ε_ls as ``label_smoothing_factor``; :func:`recipe_arguments`
    gives the recipe's) and what the recipe adds: corpora, model, tokenizer, token batches, averaging.

    ``streaming`` reads the training corpus as a stream (:mod:`vaswani.training.streaming`) through sort buffers of
    ``buffer_pairs`` pairs, for corpora larger than memory; it needs ``max_steps``. ``reset_dataloader`` resumes
    the model and optimizer but reads the corpus from its beginning (the way to resume on a changed corpus).

    ``init_from`` fine-tunes a Vaswani or Marian checkpoint (:mod:`vaswani.training.finetune`); ``preset``
    None is ``base`` from scratch and the checkpoint's shape with ``init_from``. ``lr_schedule``: ``noam``
    (§5.3, ``learning_rate`` its factor), or ``inverse_sqrt``/``constant`` at ``learning_rate`` for
    fine-tuning. ``patience``: stop when the validation ``metric_for_best_model`` has not improved for that
    many evaluations, keeping the best checkpoint."""

    args: Seq2SeqTrainingArguments
    train_corpus: dict[str, Any]
    valid_corpus: dict[str, Any] | None = None
    init_from: str | None = None
    preset: str | None = None
    config_file: Path | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: Path | None = None
    vocab_size: int = 8000
    tokenizer_pairs: int | None = None
    max_length: int = 256
    max_tokens: int = 4096
    update_tokens: int | None = None
    max_minutes: float | None = None
    lr_schedule: str = "noam"
    cooldown_steps: int = 0
    eval_max_sentences: int | None = 500
    average_last: int = 0
    patience: int | None = None
    resume: bool = False
    overwrite: bool = False
    streaming: bool = False
    buffer_pairs: int = DEFAULT_BUFFER_PAIRS
    reset_dataloader: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


def _input_paths(settings: TrainSettings) -> list[Path]:
    """The existing files and folders the run reads (corpora, tokenizer, config), resolved."""
    corpora = [settings.train_corpus, settings.valid_corpus or {}]
    named = [corpus.get(key) for corpus in corpora for key in ("source", "target", "dataset")]
    named += [settings.tokenizer, settings.config_file, settings.init_from]
    return [Path(p).resolve() for p in named if p is not None and Path(p).exists()]


def check_replaceable(settings: TrainSettings) -> None:
    """``--overwrite`` deletes only an earlier run of ours (its run file or ``checkpoint-<step>`` folders),
    never the current folder or one that holds this run's inputs: anything else could be someone's work."""
    out = settings.output_dir
    folder = out.resolve()
    if Path.cwd().resolve().is_relative_to(folder):
        raise ValueError(f"--overwrite would delete {out}, the current folder or one above it; choose a new --output.")
    if inside := [p for p in _input_paths(settings) if p.is_relative_to(folder)]:
        raise ValueError(
            f"--overwrite would delete {inside[0]}, an input of this run inside {out}; choose a new --output."
        )
    if not ((out / RUN_FILE).is_file() or numbered_checkpoints(out)):
        raise ValueError(
            f"{out} does not look like an earlier `vaswani train` run (no {RUN_FILE}, no checkpoint-<step> "
            "folders), so --overwrite leaves it alone; choose a new --output or empty it yourself."
        )


def prepare_output_dir(settings: TrainSettings) -> None:
    """Refuse to mix two runs in one folder: a used folder needs ``overwrite`` (start again) or ``resume``."""
    out = settings.output_dir
    used = out.exists() and any(out.iterdir())
    last = last_complete_checkpoint(out)
    if settings.resume:
        if last is None:
            raise ValueError(
                f"--resume: no checkpoint yet in {out}; start again with --overwrite"
                if used else f"--resume: {out} is empty or missing; start a new run without --resume"
            )
        return
    if used and not settings.overwrite and last is None:
        raise FileExistsError(
            f"{out} already holds files but no checkpoint to resume from; pass --overwrite to replace them "
            "(or choose another --output)."
        )
    if used and not settings.overwrite:
        raise FileExistsError(
            f"{out} already holds a run (last checkpoint {last}). Pass --resume to continue it or --overwrite to "
            "replace it."
        )
    if used:
        check_replaceable(settings)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _read_run_file(out: Path) -> dict[str, Any]:
    run_file = out / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.is_file() else {}


def write_run_file(settings: TrainSettings, run_id: str, result: TrainResult | None = None) -> None:
    """``vaswani_run.json``: the run's id and settings from the start (it marks the folder as a run), and its
    result once finished."""
    recipe = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "args"}
    record: dict[str, Any] = {
        "run_id": run_id,
        "corpus": corpus_identity(settings.train_corpus),
        "settings": {**settings.args.to_dict(), **recipe},
    }
    if result is not None:
        record["result"] = asdict(result)
    # Written whole under another name, then renamed: the other processes read this file while the main process
    # rewrites it at a resume, and must never see it half-written.
    run_file = settings.output_dir / RUN_FILE
    partial = run_file.with_name(f".{RUN_FILE}.partial")
    partial.write_text(json.dumps(record, indent=2, default=str))
    os.replace(partial, run_file)


def finished_result(settings: TrainSettings) -> TrainResult | None:
    """The recorded result when ``--resume`` finds a finished run that needs no more updates, else None."""
    result = _read_run_file(settings.output_dir).get("result")
    if not settings.resume or result is None:
        return None
    if 0 < settings.args.max_steps and result["steps"] < settings.args.max_steps:
        return None  # a higher --max-steps trains on
    return TrainResult(**result)


def reached_its_end(checkpoint: Path, settings: TrainSettings) -> bool:
    """Whether a checkpoint was saved after the last update of its run (a run killed before its final save)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    wanted = settings.args.max_steps if settings.args.max_steps > 0 else state["max_steps"]
    return state["global_step"] >= wanted


def has_whole_model(checkpoint: Path) -> bool:
    """Whether a checkpoint holds the whole model (DDP, DeepSpeed, FSDP's ``FULL_STATE_DICT``), not only shards."""
    return (checkpoint / "model.safetensors").is_file()


def config_json(path: Path) -> Path:
    """The config.json that ``--model-config`` names: the file itself or the one in the folder."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"--model-config {path}: there is no {file}; give a config.json or a folder that holds one.")
    return file


def check_config_settings(settings: TrainSettings) -> None:
    """Misspelt ``--set`` keys and config.json keys are errors before anything is written: the model would
    otherwise silently take the defaults."""
    check_known_keys(settings.config_overrides, known_config_keys(), "--set")
    if settings.config_file is not None:
        config_file = config_json(settings.config_file)
        check_config_dict(json.loads(config_file.read_text()), str(config_file))


def user_generation_config(settings: TrainSettings) -> GenerationConfig | None:
    """The generation_config.json next to ``--model-config``'s config.json (checked for unknown keys), if any."""
    if settings.config_file is None:
        return None
    file = config_json(settings.config_file).parent / GENERATION_CONFIG_NAME
    if not file.is_file():
        return None
    check_known_keys(json.loads(file.read_text()), known_generation_keys(), str(file))
    return GenerationConfig.from_pretrained(file.parent)


def build_config(settings: TrainSettings, tokenizer: Any) -> VaswaniConfig:
    """The model config from a preset or config file, checked against the tokenizer it will read."""
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.bos_token_id,
    }
    if settings.config_file is not None:
        config = VaswaniConfig.from_pretrained(config_json(settings.config_file), **settings.config_overrides)
        if config.vocab_size < len(tokenizer):
            raise ValueError(
                f"The config's vocab_size ({config.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({len(tokenizer)}); set vocab_size >= {len(tokenizer)} or use the tokenizer the config was made for."
            )
        wrong = {k: (getattr(config, k), v) for k, v in ids.items() if getattr(config, k) != v}
        if wrong:
            detail = ", ".join(f"{k}={a} but the tokenizer has {b}" for k, (a, b) in wrong.items())
            raise ValueError(f"The config contradicts the tokenizer: {detail}. Make them agree.")
        return config
    preset = settings.preset or "base"
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return VaswaniConfig.from_preset(preset, vocab_size=len(tokenizer), **ids, **settings.config_overrides)


def get_tokenizer(settings: TrainSettings) -> Any:
    """The run's tokenizer: the one given, the one saved by the run being resumed, or a new one (§5.1)."""
    saved = settings.output_dir / "tokenizer.json"
    if settings.resume and saved.exists():
        return load_tokenizer(settings.output_dir)
    if settings.tokenizer is not None:
        tokenizer = load_tokenizer(settings.tokenizer)
    else:
        tokenizer, _ = train_tokenizer_from_corpus(
            **settings.train_corpus,
            vocab_size=settings.vocab_size,
            max_pairs=settings.tokenizer_pairs,
            show_progress=not settings.args.disable_tqdm,
            streaming=settings.streaming,
        )
    tokenizer.save_pretrained(settings.output_dir)
    return tokenizer


def tokenized_split(corpus: dict[str, Any], tokenizer: Any, settings: TrainSettings, limit: int | None = None):
    pairs, load_report = load_parallel_corpus(**corpus)
    if limit is not None and len(pairs) > limit:
        pairs = pairs.select(range(limit))
    tokenized, report = tokenize_corpus(pairs, tokenizer, max_length=settings.max_length)
    return tokenized, load_report, report


def _trains_on_cpu() -> bool:
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def check_schedule(settings: TrainSettings) -> None:
    """Refuse a schedule that cannot train, before anything is written: no warm-up (the §5.3 rate divides by
    it), an unknown name, or the paper's factor 1.0 taken as the rate itself by a fine-tuning schedule."""
    args = settings.args
    if args.warmup_steps <= 0:
        raise ValueError(f"--warmup-steps must be > 0 (paper: 4,000; below 1 a fraction of the run), got "
                         f"{args.warmup_steps}")
    if settings.lr_schedule not in SCHEDULES:
        raise ValueError(f"unknown --lr-schedule {settings.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if settings.lr_schedule != "noam" and args.learning_rate >= MAX_FINE_TUNING_RATE:
        raise ValueError(
            f"--lr-schedule {settings.lr_schedule} trains at --learning-rate itself, and {args.learning_rate} would "
            f"diverge (1.0 is the factor on the paper's noam schedule); fine-tune at about 1e-5 to 1e-4, e.g. "
            "--learning-rate 5e-5."
        )


def check_streaming(settings: TrainSettings) -> None:
    """Refuse a streaming run that cannot be counted or read, before anything is written."""
    if not settings.streaming:
        return
    if settings.args.max_steps <= 0:
        raise ValueError("--streaming trains for --max-steps updates (a stream has no length to count epochs in); "
                         "give --max-steps")
    if settings.buffer_pairs < 1:
        raise ValueError(f"--buffer-pairs must be at least 1, got {settings.buffer_pairs}")
    check_stream_workers(settings.args.dataloader_num_workers)


def sharding_engine() -> str | None:
    """``FSDP`` or ``DeepSpeed`` when the accelerate config asks for it (its launcher says so in the environment)."""
    from accelerate.utils import parse_flag_from_env

    engines = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}
    return next((engine for engine, variable in engines.items() if parse_flag_from_env(variable)), None)


def check_engine_is_honoured() -> None:
    """accelerate skips DeepSpeed when its launcher is told that the run is on CPUs (``use_cpu`` in the config, which
    sets ``ACCELERATE_USE_CPU``): it would quietly train with DDP, every process holding the whole model and
    optimizer. Say so instead of letting the memory plan fail later. Without that flag DeepSpeed runs on CPUs with
    its own CPU accelerator (over gloo), as FSDP does (:func:`~vaswani.training.trainer.fsdp_on_cpu_processes`)."""
    from accelerate.utils import parse_flag_from_env

    if sharding_engine() == "DeepSpeed" and parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise ValueError(
            "the accelerate config asks for DeepSpeed and for CPUs (use_cpu), and accelerate then trains with DDP "
            "instead, each process holding the whole model. Leave use_cpu out: DeepSpeed runs on CPUs with its own "
            "CPU accelerator (configs/accelerate/deepspeed-zero2-cpu.yaml)."
        )


def check_sharded_run(settings: TrainSettings) -> None:
    """Under FSDP or DeepSpeed the final model is gathered from every process's shard; choosing among or averaging
    checkpoints afterwards happens on the main process alone, so it is refused there rather than left to hang."""
    engine = sharding_engine()
    if engine and (settings.average_last > 1 or settings.patience or settings.args.load_best_model_at_end):
        raise ValueError(
            f"--average-last, --patience and --load-best-model-at-end are not supported under {engine} yet: train "
            "without them and average afterwards with `vaswani average` (checkpoints saved with FULL_STATE_DICT are "
            "normal model folders)."
        )


def check_same_corpus(settings: TrainSettings) -> None:
    """``--resume`` reads on where the run stopped in its corpus; in another corpus that place means nothing, so a
    changed corpus is refused unless ``reset_dataloader`` restarts the data explicitly."""
    if not settings.resume or settings.reset_dataloader:
        return
    recorded = _read_run_file(settings.output_dir).get("corpus")
    if recorded is not None and recorded != corpus_identity(settings.train_corpus):
        raise ValueError(
            f"--resume: the training corpus is not the one {settings.output_dir} started on (another file, dataset, "
            "size or modification time), so the run's place in it means nothing. Resume with the run's corpus, or "
            "pass --reset-dataloader to keep the model and optimizer and read the new corpus from its beginning."
        )


def training_stream(
    settings: TrainSettings, tokenizer: Any, collator: Any, state: PartialState, resume_from: Path | None
) -> TokenBatchStream:
    """This process's stream of token batches (:mod:`vaswani.training.streaming`), from the checkpoint's place in
    the corpus when resuming."""
    start = None
    if resume_from is not None and not settings.reset_dataloader:
        start = resume_position(resume_from, state.process_index, state.num_processes)
    corpus = settings.train_corpus
    return TokenBatchStream(
        stream_corpus(corpus, rank=state.process_index, world_size=state.num_processes),
        tokenizer,
        settings.max_tokens,
        collate_fn=collator,
        buffer_pairs=settings.buffer_pairs,
        max_length=settings.max_length,
        empty_lines=corpus.get("empty_lines", "drop"),
        seed=settings.args.seed,
        start=start,
        name=str(corpus.get("dataset") or corpus.get("source")),
    )


#: A rate at or above this is the paper's schedule factor mistaken for a fine-tuning rate (Adam diverges).
MAX_FINE_TUNING_RATE = 1e-2


def fine_tuning_start(settings: TrainSettings) -> tuple[VaswaniForConditionalGeneration, Any]:
    """The model and tokenizer ``init_from`` names, with the run's dropouts, checked against the tokenizer
    and the model settings (:mod:`vaswani.training.finetune`)."""
    source = settings.init_from
    model = load_source_model(source)
    tokenizer = load_source_tokenizer(source, settings.tokenizer)
    check_tokenizer_matches(model.config, tokenizer, source)
    config_file = config_json(settings.config_file) if settings.config_file is not None else None
    config = fine_tuning_config(
        copy.deepcopy(model.config), source, settings.preset, config_file, settings.config_overrides
    )
    if config.to_dict() == model.config.to_dict():
        return model, tokenizer
    refit = VaswaniForConditionalGeneration(config)
    refit.load_state_dict(model.state_dict())
    refit.generation_config = model.generation_config
    return refit.train(), tokenizer


def run_arguments(settings: TrainSettings, has_eval: bool) -> Seq2SeqTrainingArguments:
    """``settings.args`` made to fit the run: no evaluation without a validation set, the gradient accumulation
    that ``update_tokens`` asks for, and with ``patience`` the best checkpoint on ``metric_for_best_model``
    (validation BLEU unless chosen) kept and loaded at the end."""
    args, changes = settings.args, {}
    if settings.streaming or settings.reset_dataloader:  # the stream resumes itself; a reset starts the data again
        changes["ignore_data_skip"] = True
    if not has_eval and args.eval_strategy != "no":
        changes["eval_strategy"] = "no"
    if settings.update_tokens:
        if args.gradient_accumulation_steps != 1:
            raise ValueError("give --update-tokens or --gradient-accumulation-steps, not both")
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        changes["gradient_accumulation_steps"] = gradient_accumulation_for(
            settings.update_tokens, settings.max_tokens, world_size
        )
    if settings.patience or args.load_best_model_at_end:
        if not has_eval or args.eval_strategy == "no":
            raise ValueError(
                "--patience and --load-best-model-at-end choose among validated checkpoints; give --valid-source "
                "and --valid-target (and an --eval-strategy other than no)."
            )
        changes["load_best_model_at_end"] = True
        if args.metric_for_best_model is None:
            changes["metric_for_best_model"] = "bleu" if args.predict_with_generate else "loss"
            changes["greater_is_better"] = None  # derived from the metric's name
    return replace(args, **changes) if changes else args


@dataclass
class TrainResult:
    """What a finished run reports; also written to ``<output_dir>/vaswani_run.json``."""

    output_dir: str
    steps: int
    train_pairs: int | None  # None for a streamed corpus (never counted)
    parameters: int
    train_seconds: float
    target_tokens_per_second: float
    final_loss: float | None
    eval_metrics: dict[str, float]
    averaged_checkpoints: list[str]
    world_size: int
    best_checkpoint: str | None = None
    best_metric: float | None = None


def train(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult | None:
    """Run the recipe: tokenizer, model (new, or ``init_from`` a checkpoint), ``VaswaniTrainer``, checkpoint
    averaging, curves; save a model folder that ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` load (with the
    paper's generation config, the checkpoint's, or the generation_config.json next to the ``config_file``).

    The saved model is the average of the last ``average_last`` checkpoints when that is above 1 (the best
    checkpoint, with ``patience``, then goes to ``<output_dir>/best``), else the best one, else the last one.

    ``callbacks`` are extra ``TrainerCallback`` s. Returns None on processes other than the main one. On a CPU
    the process gets :func:`vaswani.perf.tune_cpu_training` (allocator settings, denormals flushed to zero)."""
    started = time.monotonic()  # the time budget (``max_minutes``) counts from here
    check_schedule(settings)
    check_streaming(settings)
    args = run_arguments(settings, settings.valid_corpus is not None)
    state = PartialState(cpu=settings.args.use_cpu)  # as the Trainer will: else CPU processes do not see each other
    check_engine_is_honoured()
    check_sharded_run(settings)
    if (finished := finished_result(settings)) is not None:
        print(f"{settings.output_dir} holds a finished run of {finished.steps} updates; nothing to resume "
              "(a higher --max-steps trains on).")
        return finished if state.is_main_process else None
    check_config_settings(settings)
    generation_config = user_generation_config(settings)
    start_model, start_tokenizer = fine_tuning_start(settings) if settings.init_from else (None, None)
    if state.device.type == "cpu":
        tune_cpu_training()
        if settings.args.bf16:
            warn_if_bf16_emulated("training")
    run_id = (settings.resume and _read_run_file(settings.output_dir).get("run_id")) or uuid.uuid4().hex
    # One process prepares the folder and the tokenizer, the others load it. The processes waiting for another
    # learn of its failure as a lost peer, and say so in one line (explained_stops), not with a traceback.
    with explained_stops(settings.output_dir), state.main_process_first():
        if state.is_main_process:
            check_same_corpus(settings)
            prepare_output_dir(settings)
            write_run_file(settings, run_id)
            tokenizer = start_tokenizer or get_tokenizer(settings)
            if start_tokenizer is not None:
                tokenizer.save_pretrained(settings.output_dir)
        else:
            tokenizer = start_tokenizer or load_tokenizer(settings.output_dir)
    config = start_model.config if start_model is not None else build_config(settings, tokenizer)
    # One process per machine reads and tokenizes; the others load its cache.
    with explained_stops(settings.output_dir), state.local_main_process_first():
        train_set = None
        if not settings.streaming:
            train_set, _, train_report = tokenized_split(settings.train_corpus, tokenizer, settings)
            print(f"training pairs: {train_report.pairs_out} ({train_report.overlong_dropped} over "
                  f"{settings.max_length} tokens dropped)")
        valid_set = None
        if settings.valid_corpus is not None:
            valid_set, _, _ = tokenized_split(settings.valid_corpus, tokenizer, settings, settings.eval_max_sentences)

    resume_from = last_complete_checkpoint(settings.output_dir) if settings.resume else None
    if resume_from is not None:
        check_resumable(config, resume_from)
    # a sharded checkpoint holds no model folder: the Trainer loads it and gathers the final model
    ended = resume_from is not None and reached_its_end(resume_from, settings) and has_whole_model(resume_from)
    torch.manual_seed(settings.args.seed)
    if ended:
        model = VaswaniForConditionalGeneration.from_pretrained(resume_from)
    else:
        model = start_model or VaswaniForConditionalGeneration(config)
    if generation_config is not None:
        model.generation_config = generation_config
    callbacks = [*callbacks, RunIdentity(run_id)]
    if settings.max_minutes:  # with a cool-down and no step total, the cool-down ends the time budget
        fit_cooldown = bool(settings.cooldown_steps) and settings.args.max_steps <= 0
        callbacks = [*callbacks, TimeBudget(settings.max_minutes, fit_cooldown, started)]
    if settings.patience:
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=settings.patience)]
    collator = seq2seq_collator(tokenizer, model)
    if settings.streaming:
        train_set = training_stream(settings, tokenizer, collator, state, resume_from)
        print(f"streaming {train_set.name} in sort buffers of {settings.buffer_pairs:,} pairs on each of "
              f"{state.num_processes} processes")
    trainer = VaswaniTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=valid_set,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(tokenizer, tokenizer.pad_token_id),
        callbacks=callbacks,
        max_tokens=settings.max_tokens,
        lr_schedule=settings.lr_schedule,
        cooldown_steps=settings.cooldown_steps,
    )
    if ended:  # killed between its last checkpoint and the final save: finish without another update
        print(f"{resume_from} was saved after the run's last update; finishing the run without training.")
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        train_metrics: dict[str, float] = {}
    else:
        with explained_stops(settings.output_dir):
            resume = str(resume_from) if resume_from else None
            train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    bad_step = trainer.nonfinite.bad_step
    if bad_step is not None:
        raise ValueError(
            f"The training loss became NaN/inf at step {bad_step}; stopped without saving that state: "
            f"{resume_hint(settings.output_dir)}, with a lower --learning-rate or a longer --warmup-steps."
        )
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded:  # gathering the whole model from its shards takes every process
        if trainer.is_fsdp_enabled:  # checkpoints may be sharded; the final folder is a whole model
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        with explained_stops(settings.output_dir):
            trainer.save_model(str(settings.output_dir))
    tokens = trainer.target_tokens if trainer.target_tokens is not None else torch.zeros((), dtype=torch.long)
    target_tokens = int(trainer.accelerator.reduce(tokens.to(trainer.args.device), "sum"))  # all processes' tokens
    best = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    averaged: list[str] = []
    if trainer.is_world_process_zero():
        averaged = save_final_model(trainer, settings, tokenizer, best, sharded)
    trainer.accelerator.wait_for_everyone()
    if settings.average_last > 1 and not trainer.is_world_process_zero():  # validate the averaged model everywhere
        trainer.model = VaswaniForConditionalGeneration.from_pretrained(settings.output_dir)
    # every process takes part in validation (the Trainer gathers the predictions), then only the main one reports
    eval_metrics = trainer.evaluate() if valid_set is not None else {}
    if not trainer.is_world_process_zero():
        return None
    seconds = train_metrics.get("train_runtime", 0.0)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = TrainResult(
        output_dir=str(settings.output_dir),
        steps=trainer.state.global_step,
        train_pairs=None if settings.streaming else len(train_set),
        parameters=trainer.model.num_parameters(),
        train_seconds=seconds,
        target_tokens_per_second=target_tokens / seconds if seconds else math.nan,
        final_loss=losses[-1] if losses else None,
        eval_metrics={k: float(v) for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        averaged_checkpoints=averaged,
        world_size=trainer.args.world_size,
        best_checkpoint=best,
        best_metric=trainer.state.best_metric if best is not None else None,
    )
    plot_training_curves(trainer.state.log_history, settings.output_dir / "training_curves.png")
    write_run_file(settings, run_id, result)
    return result


def save_final_model(trainer: VaswaniTrainer, settings: TrainSettings, tokenizer: Any, best: str | None,
                     sharded: bool) -> list[str]:
    """On the main process: the run folder's model (the average of the last ``average_last`` checkpoints if asked,
    §6.1, the best one kept beside it in ``best/``) and tokenizer. Returns the averaged checkpoints."""
    averaged: list[str] = []
    if settings.average_last > 1:  # §6.1: average the last N checkpoints
        if best is not None:  # the Trainer loaded the best checkpoint: it stays a model of its own
            with explained_stops(settings.output_dir):
                trainer.save_model(str(settings.output_dir / BEST_DIR))
                tokenizer.save_pretrained(settings.output_dir / BEST_DIR)
        # a run stopped by its time budget may have saved fewer: average what there is (all of them)
        checkpoints = collect_checkpoints([settings.output_dir])[-settings.average_last :]
        # this folder holds one run; checkpoints saved before run ids were recorded lack one (force)
        averaged_dir = average_checkpoints(checkpoints, settings.output_dir / "averaged", overwrite=True, force=True)
        trainer.model = VaswaniForConditionalGeneration.from_pretrained(averaged_dir)
        shutil.rmtree(averaged_dir)
        averaged = [str(c) for c in checkpoints]
    with explained_stops(settings.output_dir):
        if not sharded:  # under FSDP and DeepSpeed every process saved it already
            trainer.save_model(str(settings.output_dir))
        tokenizer.save_pretrained(settings.output_dir)
    return averaged


def plot_training_curves(log_history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss, learning rate and validation loss/BLEU against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "training loss": [(e["step"], e["loss"]) for e in log_history if "loss" in e],
        "learning rate": [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e],
        "validation loss": [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e],
        "validation BLEU": [(e["step"], e["eval_bleu"]) for e in log_history if "eval_bleu" in e],
    }
    series = {name: points for name, points in series.items() if points}
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(4 * max(1, len(series)), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
