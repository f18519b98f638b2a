"""Training throughput of one optimisation step: float32 against bf16 autocast + channels-last,
and AdamW's default update against its fused one.

One AdamW step (forward, loss, backward, update) of a stream network on a batch of random
patches with random targets, timed as the median of ``--repeats`` steps after two warm-up steps,
for each precision and memory layout. On a CPU with native bfloat16 (AVX512-BF16/AMX) the `lite`
preset turns on bf16 autocast with channels-last memory (`train.cpu_has_bf16`); this measures
why, and on a CPU without it (where oneDNN converts to float32 and back) why not: the two
kinds of CPU write separate sections. Each setting is timed with PyTorch's default AdamW (one
loop over the parameters, a dozen passes over memory) and with the fused one that `train` uses
where it exists (`train._adamw`). On a CUDA GPU it measures the `paper` preset's network.

``--compile`` asks another question: does ``torch.compile`` (TorchInductor, which writes fused
C++/OpenMP kernels on a CPU and Triton ones on a GPU) make the step that ``train`` runs on this
device faster? It times that one setting (the precision and memory layout ``train`` picks here,
fused AdamW) eager and compiled, and how long the first compiled step takes, compilation
included: a ``lite`` run is measured in minutes, so compile time is paid out of its budget.

    .venv/bin/python benchmarks/bench_training.py                    # lite StarDist, CPU
    .venv/bin/python benchmarks/bench_training.py --preset paper --device cuda --batch 16 --patch 512
    .venv/bin/python benchmarks/bench_training.py --stream hover --patch 128 --compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, now, write_section  # noqa: E402


def step_seconds(
    config,
    device,
    *,
    amp: bool,
    channels_last: bool,
    fused: bool,
    batch: int,
    repeats: int,
    compile: bool = False,
):
    """``(median seconds of one step after two warm-up steps, seconds of the first step)``; the
    first step is where ``torch.compile`` compiles."""
    from cellseg_lite import train

    torch.manual_seed(0)
    model = train.build_model(config, pretrained=False).to(device)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimizer = train._adamw(model, config.replace(lr=1e-4), fused=fused)
    forward = torch.compile(model) if compile else model
    p = config.patch_size
    x = torch.rand(batch, 3, p, p, device=device).contiguous(memory_format=memory)
    if config.stream == "stardist":
        targets = {
            "prob": torch.rand(batch, 1, p, p, device=device),
            "dist": 10 * torch.rand(batch, config.n_rays, p, p, device=device),
        }
    else:
        targets = {
            "foreground": (torch.rand(batch, p, p, device=device) > 0.5).float(),
            "hv": 2 * torch.rand(batch, 2, p, p, device=device) - 1,
        }
    autocast, _ = train._autocast(device, amp)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            outputs = forward(x)
        loss = train._loss(config, outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - start
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), first


def compile_section(args, config, device) -> tuple[str, str]:
    """``(key, section)``: the step ``train`` runs on this device, eager and compiled."""
    from cellseg_lite import train

    amp = train._auto_amp(device)
    rows = []
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    for compiled in (False, True):
        # an empty kernel cache, so the first step pays the whole compilation as a new run would
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            seconds, first = step_seconds(
                config, device, amp=amp, channels_last=amp, fused=True, batch=args.batch,
                repeats=args.repeats, compile=compiled,
            )  # fmt: skip
        rows.append((compiled, seconds, first))
        print(f"compile={compiled}: {seconds:.3f} s/step", flush=True)
    if previous is None:  # not left pointing at a deleted folder
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    base = rows[0][1]
    precision = "float32" if not amp else ("bf16" if device.type == "cpu" else "mixed precision")
    lines = [
        f"| {'torch.compile' if compiled else 'eager'} | {s:.3f} | {args.batch / s:.1f} | "
        f"{base / s:.2f}x | {first:.1f} |"
        for compiled, s, first in rows
    ]
    speedup = base / rows[1][1]
    saved = base - rows[1][1]
    if saved > 0:
        payback = f"it pays its first step back after {rows[1][2] / saved:.0f} steps"
    else:
        payback = "every compiled step is slower, so the compile time is never paid back"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    section = f"""## Training throughput: `torch.compile` on the `{args.preset}` {args.stream} step ({device_name})

{config.backbone}, {config.decoder} decoder, batch {args.batch} of {args.patch} x {args.patch},
the setting `train` uses on this device ({precision}, {"channels-last" if amp else "contiguous"},
fused AdamW), median of {args.repeats} steps after 2 warm-up steps, {args.threads} torch threads;
`torch.compile(model)` with its defaults (TorchInductor). The first step's seconds include the
compilation, from an empty kernel cache.

| forward pass | seconds / step | patches / s | speed-up | first step (s) |
|---|---|---|---|---|
{chr(10).join(lines)}

Compiled against eager: {speedup:.2f}x per step; {payback}.

- Command: `.venv/bin/python benchmarks/bench_training.py --preset {args.preset} --stream {args.stream} --device {args.device} --batch {args.batch} --patch {args.patch} --compile`
- Machine: {machine("torch", "timm")}; native CPU bf16: {train.cpu_has_bf16()}
- Date: {now()}
"""
    return f"bench_training_compile_{device.type}", section


def main(argv: list[str] | None = None) -> int:
    from cellseg_lite import train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="lite", choices=train.PRESETS)
    parser.add_argument("--stream", default="stardist", choices=train.STREAMS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time train's setting on this device eager and under torch.compile instead",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = train.preset(args.preset, stream=args.stream, patch_size=args.patch)
    if args.compile:
        key, section = compile_section(args, config, device)
        print(section)
        if not args.no_write:
            write_section(key, section)
        return 0
    rows = []
    settings = [
        (amp, channels_last, fused)
        for amp, channels_last in ((False, False), (False, True), (True, False), (True, True))
        for fused in (False, True)
    ]
    for amp, channels_last, fused in settings:
        seconds, _ = step_seconds(
            config, device, amp=amp, channels_last=channels_last, fused=fused, batch=args.batch,
            repeats=args.repeats,
        )  # fmt: skip
        rows.append((amp, channels_last, fused, seconds))
        print(f"amp={amp} channels_last={channels_last} fused={fused}: {seconds:.3f} s/step")
    base = rows[0][3]
    dtype = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    lines = [
        f"| {dtype if amp else 'float32'} | {'channels-last' if cl else 'contiguous'} | "
        f"{'fused' if fused else 'default'} | {s:.3f} | {args.batch / s:.1f} | {base / s:.2f}x |"
        for amp, cl, fused, s in rows
    ]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    section = f"""## Training throughput: one step of the `{args.preset}` {args.stream} network ({device_name})

{config.backbone}, {config.decoder} decoder, batch {args.batch} of {args.patch} x {args.patch},
AdamW, median of {args.repeats} steps after 2 warm-up steps, {args.threads} torch threads.

| precision | memory layout | AdamW | seconds / step | patches / s | speed-up vs the first row |
|---|---|---|---|---|---|
{chr(10).join(lines)}

- Command: `.venv/bin/python benchmarks/bench_training.py --preset {args.preset} --stream {args.stream} --device {args.device} --batch {args.batch} --patch {args.patch}`
- Machine: {machine("torch", "timm")}; native CPU bf16: {train.cpu_has_bf16()}
- Date: {now()}
"""
    print(section)
    if not args.no_write:
        # CPUs with and without native bf16 keep separate sections: they answer differently
        native = device.type != "cpu" or train.cpu_has_bf16()
        key = f"bench_training_{device.type}{'' if native else '_no_bf16'}"
        if native and (args.stream, args.patch) == ("hover", 128):  # the lite HoVer step
            key += "_hover128"
        write_section(key, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
