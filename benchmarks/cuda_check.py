"""CUDA path check: bf16/fp16 training steps, attention back-ends, cached generate; prints a Markdown table.

python benchmarks/cuda_check.py > benchmarks/cuda_check.md
"""

from __future__ import annotations

import statistics
import time

import torch

from vaswani import VaswaniConfig, VaswaniForConditionalGeneration


def timed(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_row(model, ids, labels, implementation: str, dtype: torch.dtype) -> str:
    """One mixed-precision Adam step (GradScaler for fp16), timed; a table row."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = model(input_ids=ids, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    name = str(dtype).removeprefix("torch.")
    try:
        loss = step()
        seconds = timed(step)
    except Exception as err:  # a survey of what works: report and go on
        return f"| train step | {implementation} | {name} | failed: {str(err).splitlines()[0][:90]} |"
    tokens = labels.numel() / seconds
    return f"| train step | {implementation} | {name} | loss {loss.item():.3f}, {tokens:,.0f} target tokens/s |"


def generate_row(model, ids, implementation: str) -> str:
    """Beam-4 generation in bf16: cached and uncached must agree; tokens/s."""
    kwargs = {"input_ids": ids, "num_beams": 4, "max_new_tokens": 20}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        try:
            same = torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))
            seconds = timed(lambda: model.generate(**kwargs), 3)
        except Exception as err:
            return f"| beam-4 generate | {implementation} | bf16 | failed: {str(err).splitlines()[0][:90]} |"
    return (
        f"| beam-4 generate | {implementation} | bf16 | cached == uncached: {same}, "
        f"{ids.shape[0] * 20 / seconds:,.0f} tokens/s |"
    )


def main() -> None:
    torch.manual_seed(0)
    config = VaswaniConfig.from_preset("base", vocab_size=8000)
    ids = torch.randint(4, 8000, (128, 32), device="cuda")
    labels = torch.randint(4, 8000, (128, 32), device="cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, base shape, vocab 8000, batch 128x32")
    print()
    print("| check | attention | precision | result |")
    print("|---|---|---|---|")
    for implementation in ("eager", "sdpa", "flex_attention", "flash_attention_2"):
        try:
            model = VaswaniForConditionalGeneration(config).cuda()
            model.set_attn_implementation(implementation)
        except (ImportError, ValueError) as err:
            print(f"| load | {implementation} | - | unavailable: {str(err).splitlines()[0][:90]} |")
            continue
        for dtype in (torch.bfloat16, torch.float16):
            print(train_step_row(model.train(), ids, labels, implementation, dtype))
        print(generate_row(model.eval(), ids[:16], implementation))
    print()
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
