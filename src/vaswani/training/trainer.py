"""The paper's training recipe (§5) on transformers' ``Seq2SeqTrainer``.

:class:`VaswaniTrainer` is a ``Seq2SeqTrainer`` whose training batches come from
:class:`~vaswani.training.batching.TokenBatchSampler` (about N tokens per batch, §5.1), whose optimizer and
schedule are the paper's Adam and warm-up/inverse-square-root rate (§5.3), and whose loss is label-smoothed
cross-entropy (§5.4). Everything else — gradient accumulation, mixed precision, checkpoints with optimizer
and RNG state, resuming, evaluation with ``generate()`` and sacreBLEU, logging, DDP/FSDP through
``accelerate`` — is the Trainer's own.
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, TrainerCallback

from ..configuration import RETIRED_KEYS, WRITTEN_BY_TRANSFORMERS
from .batching import token_batch_sampler_for
from .schedule import SCHEDULES, ScheduleLambda, get_schedule, noam_peak, paper_adam
from .streaming import TokenBatchStream, check_stream_workers, write_stream_state

CHECKPOINT_PREFIX = "checkpoint-"


def fsdp_on_cpu_processes(cpu: bool = False) -> None:
    """accelerate reads an FSDP config only for process groups of accelerators: CPU processes (gloo) would quietly
    train with DDP, each holding the whole model. torch's ``fully_shard`` runs on gloo all the same, so before the
    ``Accelerator`` is built (``cpu``: its argument, or the Trainer's ``use_cpu``) a CPU process group under an
    FSDP config is presented as a device group, the case in which accelerate takes the FSDP plugin (and then
    records the group as FSDP)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


class VaswaniTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` with token-based batches, the paper's Adam + schedule and label smoothing.

    The schedule's height and warm-up are the ``args``' ``learning_rate`` and ``warmup_steps``, ε_ls is their
    ``label_smoothing_factor`` (paper: 0.1): the model computes the smoothed loss itself (``smoothing=ε``)
    instead of the Trainer's ``LabelSmoother``, which would need every logit.

    Args:
        max_tokens: token budget of one training batch on one process (paper: ~25,000 per side in total).
        lr_schedule: ``noam``, the paper's (§5.3; ``learning_rate`` is its scale factor, paper: 1.0), or for
            fine-tuning ``inverse_sqrt`` or ``constant`` (``learning_rate`` is the rate after the warm-up);
            see :mod:`vaswani.training.schedule`.
        cooldown_steps: decay the rate linearly towards zero over this many last updates (0: none; needs
            ``max_steps``).
        Other arguments are ``Seq2SeqTrainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        max_tokens: int = 25000,
        lr_schedule: str = "noam",
        cooldown_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
        model = kwargs.get("model", args[0] if args else None)
        accepted = inspect.signature(model.forward).parameters if model is not None else {}
        self.nonfinite = StopOnNonFiniteLoss()
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.nonfinite]
        super().__init__(*args, **kwargs)
        self.smoothing = 0.0
        if "smoothing" in accepted:  # ε_ls goes to the model's own loss, not to LabelSmoother
            self.smoothing, self.label_smoother = self.args.label_smoothing_factor, None
        self.model_skips_logits = "skip_logits" in accepted
        self.max_tokens = max_tokens
        self.lr_schedule = lr_schedule
        self.cooldown_steps = cooldown_steps
        #: Target tokens trained on by this process in this ``train()`` call, and the stream position of its last
        #: trained batch (streaming runs only).
        self.target_tokens: torch.Tensor | None = None
        self.stream_position: dict[str, Any] | None = None

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's ``Accelerator``, with FSDP on CPU processes too (:func:`fsdp_on_cpu_processes`)."""
        fsdp_on_cpu_processes(self.args.use_cpu)
        super().create_accelerator_and_postprocess()

    @property
    def fsdp_state_dict_type(self) -> str | None:
        """How FSDP saves checkpoints, ``FULL_STATE_DICT`` or ``SHARDED_STATE_DICT``; None without FSDP."""
        if not self.is_fsdp_enabled:
            return None
        return str(self.accelerator.state.fsdp_plugin.state_dict_type).rsplit(".", 1)[-1]

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint; before it (so that a checkpoint that counts as complete has them) in a
        streaming run every process's place in the stream, and in a sharded FSDP run the model's config, which
        the Trainer writes only beside whole weights."""
        folder = Path(self._get_output_dir(trial)) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        positions = gather_object([self.stream_position]) if isinstance(self.train_dataset, TokenBatchStream) else None
        if self.args.should_save and positions is not None:
            write_stream_state(folder, positions)
        if self.args.should_save and self.fsdp_state_dict_type == "SHARDED_STATE_DICT":
            self.model.config.save_pretrained(folder)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """The Trainer's loading, except for FSDP checkpoints with whole weights: torch's broadcast of a full state
        dict breaks on tied weights stored under each of their names, as accelerate's pytorch_model_fsdp.bin
        stores them, so the weights come from the checkpoint's model.safetensors (each tied weight once, and no
        unpickling) and are scattered to the shards from the main process."""
        if self.fsdp_state_dict_type != "FULL_STATE_DICT":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model = model if model is not None else self.model
        weights = Path(resume_from_checkpoint) / "model.safetensors"
        state = load_file(weights) if self.accelerator.is_main_process else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        loaded = set_model_state_dict(model, state, options=options)
        untied = set(loaded.missing_keys) - set(self.model.all_tied_weights_keys)  # tied ones load with their source
        if untied or loaded.unexpected_keys:
            raise ValueError(f"{weights} does not fit the model: missing {sorted(untied)}, unexpected "
                             f"{sorted(loaded.unexpected_keys)}; resume with the model the run started with.")

    def get_train_dataloader(self) -> DataLoader:
        """Batches of similar-length pairs with at most ``max_tokens`` tokens, shuffled per epoch with the
        run's seed; ``accelerate`` hands distinct batches to each process.

        A :class:`~vaswani.training.streaming.TokenBatchStream` makes its batches itself, from this process's
        share of the corpus, so its loader is not given to ``accelerate``: by default accelerate would read an
        iterable dataset on the main process only and split each batch across the processes
        (``dispatch_batches``), which a corpus read on every process does not need."""
        if self.train_dataset is None:
            raise ValueError("VaswaniTrainer needs a train_dataset.")
        if isinstance(self.train_dataset, TokenBatchStream):
            check_stream_workers(self.args.dataloader_num_workers)
            return DataLoader(
                self.train_dataset,
                batch_size=None,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
                # its own generator: starting the loader then draws nothing from torch's, so dropout after a resume
                # (which restores torch's generator and then starts the loader) draws what the unbroken run drew
                generator=torch.Generator(),
            )
        sampler = token_batch_sampler_for(self.train_dataset, self.max_tokens, seed=self.args.seed)
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ):
        """The model's own loss with ``smoothing`` = ε_ls: given the labels, a Vaswani model computes only the
        positions the loss reads (see ``unpadded.Unpadded``), and it leaves out the logits when only the loss is
        wanted (a training step)."""
        if "labels" in inputs and self.compute_loss_func is None and self.label_smoother is None:
            if self.smoothing:
                inputs = {**inputs, "smoothing": self.smoothing}
            if self.model_skips_logits:
                inputs = {**inputs, "skip_logits": not return_outputs}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if "stream_position" in inputs:  # a streamed batch: where the stream is once it is trained on
            inputs = dict(inputs)
            self.stream_position = inputs.pop("stream_position")
        tokens = inputs["labels"].ne(-100).sum()  # counted where the labels are: no wait for a device
        self.target_tokens = tokens if self.target_tokens is None else self.target_tokens + tokens
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.report(loss, self.state.global_step + 1)
        return loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 (§5.3)."""
        if self.optimizer is None:
            model = model if model is not None else self.model
            self.optimizer = paper_adam([p for p in model.parameters() if p.requires_grad])
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The ``lr_schedule`` with the ``args``' warm-up (§5.3 for ``noam``), and the optional cool-down over
        the last ``cooldown_steps`` of the ``num_training_steps`` updates."""
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            if warmup < 1:
                raise ValueError(f"warmup_steps must give at least one warm-up update, got {self.args.warmup_steps}")
            peak = self.args.learning_rate
            if self.lr_schedule == "noam":
                peak = noam_peak(self.model.config.d_model, warmup, scale=peak)
            self.lr_scheduler = get_schedule(
                optimizer or self.optimizer,
                peak,
                warmup,
                "constant" if self.lr_schedule == "constant" else "inverse_sqrt",
                cooldown_steps=self.cooldown_steps,
                total_steps=num_training_steps,
            )
        return self.lr_scheduler


def seq2seq_collator(tokenizer: Any, model: Any) -> DataCollatorForSeq2Seq:
    """transformers' collator: pads sources with ``<pad>``, labels with -100, adds shifted decoder inputs."""
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8)


def gradient_accumulation_for(update_tokens: int | None, max_tokens: int, world_size: int = 1) -> int:
    """Batches to accumulate so that one update sees about ``update_tokens`` tokens (≥ 1)."""
    if not update_tokens:
        return 1
    return max(1, math.ceil(update_tokens / (max_tokens * world_size)))


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop the run at the first NaN or infinite training loss, without saving the broken state.

    :class:`VaswaniTrainer` reports every step's loss (:meth:`report`); the step that broke is neither saved
    nor continued, so the last checkpoint on disk holds good weights to ``--resume`` from (perhaps with a
    lower learning rate).
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None

    def report(self, loss: torch.Tensor, step: int) -> None:
        if self.bad_step is None and not torch.isfinite(loss.detach()).all():
            self.bad_step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.bad_step is not None:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
        return control


class TimeBudget(TrainerCallback):
    """Stop training after ``minutes`` of wall time (the demo's "trains in at most N minutes"), counted from
    ``started`` (a ``time.monotonic()`` value: :func:`~vaswani.training.run.train` passes the start of the run,
    so that building the tokenizer and tokenizing the corpus count too) or else from the start of training.

    With ``fit_cooldown`` and a schedule with a cool-down (:class:`~vaswani.training.schedule.ScheduleLambda`
    with ``cooldown_steps``), the cool-down is placed at the end of the time budget instead of at a step
    count given in advance: until it begins, the schedule's ``total_steps`` is set after every update to the
    updates that fit in the budget at the recent pace; once the rate starts to fall, the total stays fixed
    and the run stops when it is reached (or when the time is up, whichever comes first). A machine that
    runs slower or faster than expected then still ends its run at a small learning rate.
    """

    def __init__(self, minutes: float, fit_cooldown: bool = False, started: float | None = None) -> None:
        self.seconds = minutes * 60
        self.fit_cooldown = fit_cooldown
        self.started = started
        self.recent: deque[tuple[int, float]] = deque()
        self.restart()

    def restart(self) -> None:
        """Start the clock (at ``started`` if given) and forget the recent pace."""
        self.start = time.monotonic() if self.started is None else self.started
        self.recent.clear()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        self.restart()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):  # noqa: D102
        now = time.monotonic()
        schedule = getattr(lr_scheduler, "lr_lambdas", [None])[0]
        if self.fit_cooldown and isinstance(schedule, ScheduleLambda) and schedule.cooldown_steps:
            self.place_cooldown(schedule, state.global_step, now, state.max_steps)
            if state.global_step >= schedule.total_steps:
                control.should_training_stop = True
                control.should_save = True
        if now - self.start > self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control

    def place_cooldown(self, schedule: ScheduleLambda, step: int, now: float, max_steps: int) -> None:
        """Set ``schedule.total_steps`` to the updates that fit in the budget (at most ``max_steps``) at the
        pace of the last ``cooldown_steps`` updates (start-up excluded), unless the cool-down has begun."""
        self.recent.append((step, now))
        if len(self.recent) > schedule.cooldown_steps + 1:
            self.recent.popleft()
        if schedule.total_steps - step < schedule.cooldown_steps:  # cooling down: the total stays
            return
        first_step, first_time = self.recent[0]
        if step == first_step:
            return
        pace = (step - first_step) / (now - first_time)
        fits = step + int(pace * max(self.seconds - (now - self.start), 0.0))
        total = max(fits, step + schedule.cooldown_steps)
        schedule.total_steps = min(total, max_steps) if max_steps > 0 else total


#: Where a checkpoint keeps its weights and its optimizer state, by what trained it: the Trainer alone or with DDP
#: (``model.safetensors``, ``optimizer.pt``), FSDP with full state dicts (``optimizer.bin``), FSDP with sharded ones
#: (``torch.distributed.checkpoint`` folders, whose ``.metadata`` is written when every shard is), DeepSpeed (its
#: ``global_step<N>`` folder, named in ``latest`` once written).
CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model_fsdp_0/.metadata")
CHECKPOINT_OPTIMIZER = ("optimizer.pt", "optimizer.bin", "optimizer_0/.metadata", "latest")


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint is usable when its weights, optimizer, scheduler and trainer state are all readable.

    The Trainer writes ``trainer_state.json`` last, so a run killed while writing leaves a folder that
    fails this check (missing or unparsable files) and is skipped on resume.
    """
    if not all((folder / name).is_file() for name in ("scheduler.pt", "trainer_state.json")):
        return False
    if not (any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS)
            and any((folder / name).is_file() for name in CHECKPOINT_OPTIMIZER)):
        return False
    try:
        json.loads((folder / "trainer_state.json").read_text())
        if (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
                weights.keys()
    except (OSError, ValueError, json.JSONDecodeError, Exception):  # safetensors raises its own error type
        return False
    return True


def last_complete_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest ``checkpoint-<step>`` folder of ``run_dir`` that :func:`is_complete_checkpoint` accepts."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    steps = sorted(
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    )
    for _, folder in reversed(steps):
        if is_complete_checkpoint(folder):
            return folder
    return None


def resume_hint(run_dir: str | os.PathLike[str]) -> str:
    """Where a stopped run can continue from: its last complete checkpoint, or nowhere yet."""
    last = last_complete_checkpoint(run_dir)
    if last is None:
        return f"no checkpoint yet in {run_dir}; start again with --overwrite"
    return f"the last complete checkpoint is {last}; continue from it with --resume"


#: How torch.distributed reports a process of the group that is gone (gloo's TCP pair, NCCL's watchdog).
LOST_PEER_SIGNS = ("closed by peer", "reset by peer", "remote worker", "communicator was aborted")


def _lost_peer(err: BaseException) -> bool:
    return isinstance(err, torch.distributed.DistError) or any(sign in str(err) for sign in LOST_PEER_SIGNS)


class Preempted(KeyboardInterrupt):
    """SIGTERM while training: its message already says where the run can continue from."""


def _stop_on_sigterm(run_dir: Path) -> Callable[[int, Any], None]:
    """A SIGTERM handler whose message carries the resume hint itself, so that it stays explained even when it lands
    while another stop (a lost process of the group) is being explained."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # launchers may repeat it; one explanation is enough
        raise Preempted(
            f"stopped by SIGTERM (a launcher ending the group, or a scheduler preempting the job); "
            f"{resume_hint(run_dir)}"
        )

    return stop


@contextmanager
def explained_stops(run_dir: Path) -> Iterator[None]:
    """Ctrl-C, SIGTERM, a lost process of the group and a full disk while training or saving say where the run can
    continue from (see :func:`resume_hint`) in one line instead of a long traceback."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm(run_dir)) if main_thread else None
    try:
        yield
    except Preempted:
        raise
    except KeyboardInterrupt as err:
        raise KeyboardInterrupt(f"{err}; {resume_hint(run_dir)}" if str(err) else resume_hint(run_dir)) from None
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError "file write failed"
        if _lost_peer(err):
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConnectionError(
                f"a process of the training group stopped ({first_line}); {resume_hint(run_dir)}, launching as many "
                "processes as before"
            ) from None
        if getattr(err, "errno", None) != errno.ENOSPC and "file write failed" not in str(err):
            raise
        free = shutil.disk_usage(run_dir).free
        raise OSError(
            errno.ENOSPC, f"the disk holding {run_dir} is full ({free / 2**20:,.0f} MiB free) while saving; free "
            f"space (or lower --save-total-limit), then: {resume_hint(run_dir)}"
        ) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


#: Config entries that record how a model was saved or is run rather than what it is, and retired ones.
_SAVING_KEYS = {*WRITTEN_BY_TRANSFORMERS, *RETIRED_KEYS, "use_cache"}


def check_resumable(config: Any, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` with a model config that differs from the one it was saved with (another
    --preset, --config or --set), naming the differences, instead of a page of weight-shape mismatches."""
    if not (checkpoint / "config.json").is_file():  # a checkpoint of shards alone: nothing to compare with
        return
    saved, wanted = type(config).from_pretrained(checkpoint).to_dict(), config.to_dict()
    differ = sorted(key for key in (saved.keys() | wanted.keys()) - _SAVING_KEYS if saved.get(key) != wanted.get(key))
    if differ:
        detail = ", ".join(f"{key}={saved.get(key)!r} there but {wanted.get(key)!r} now" for key in differ)
        raise ValueError(
            f"--resume: {checkpoint} was trained with another model config ({detail}); resume with the --preset, "
            "--config and --set the run started with, or start again with --overwrite."
        )
