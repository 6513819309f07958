"""Training-step time per backbone: fp32 vs bf16 autocast, and model FLOPs utilisation.

For each backbone and size, one training step (forward, cross-entropy,
backward, SGD with momentum; policy ``all``) is timed in fp32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, the variants timed
round-robin so both see the same load. The step's model FLOPs (forward plus
backward, counted once with ``FlopCounterMode``) over its time gives the
achieved GFLOP/s, compared with this machine's fp32 and bf16 matmul peak
measured in the same run (model FLOPs utilisation, MFU). For the CNNs the
step is also timed with the model and clip in ``channels_last_3d``, and a
single Conv3d (forward+backward) is timed in fp32/bf16 x contiguous/
channels_last_3d.

Sizes (``--sizes``):

* ``tiny`` - each backbone's ``tiny`` preset, batch 2 (overhead-bound toys);
* ``mid``  - the real layer widths at a clip size that runs in seconds on
  2 cores: slowfusion ``full`` (the paper's network, 10 x 170 x 170) at
  batch 8, i3d ``kinetics`` at width 1 on 16 x 112 x 112, batch 1, and vivit
  ``vivit-b`` widths (dim 768, 12 heads, MLP 3072, 224 x 224 with 16 x 16
  patches = 197 tokens per frame slot) with 4 frames and 4 spatial + 2
  temporal layers, batch 1;
* ``full`` - the full presets, batch 1 (slowfusion ``full``, i3d ``kinetics``
  64 x 224 x 224, vivit ``vivit-b`` 32 x 224 x 224), one timed step each for
  i3d and vivit unless ``--repeat``: minutes per backbone.

``--quick`` runs ``tiny`` at batch 1, one timed step per variant, and a
1024 x 1024 matmul peak: seconds, for the test suite (its numbers are noise).
``--profile`` adds a per-category breakdown (matmul, attention, casts,
optimizer, ...) of one vivit step in fp32 and in bf16.

Usage::

    python benchmarks/bench_step.py                 # tiny + mid, all CPUs
    python benchmarks/bench_step.py --quick         # seconds
    python benchmarks/bench_step.py --sizes mid --profile --threads 2
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _common import base_parser, load_line, rss_line, setup_threads, time_interleaved
from vtransfer.models.registry import build_backbone
from vtransfer.policies.freezing import apply_policy, resolve_policy, set_train_mode

BACKBONES = ("slowfusion", "i3d", "vivit")
CNNS = ("slowfusion", "i3d")
NUM_CLASSES = 10
SIZES = ("tiny", "mid", "full")


@dataclass(frozen=True)
class ModelSize:
    """One benchmarked configuration: registry preset, constructor overrides, batch size, a description."""

    preset: str
    overrides: dict[str, Any]
    batch: int
    description: str


CONFIGS: dict[str, dict[str, ModelSize]] = {
    "tiny": {
        "slowfusion": ModelSize("tiny", {}, 2, "tiny preset, 10x64x64"),
        "i3d": ModelSize("tiny", {}, 2, "tiny preset (width 1/8), 16x112x112"),
        "vivit": ModelSize("tiny", {}, 2, "tiny preset (dim 64), 8x64x64"),
    },
    "mid": {
        # Batch 8: 90% of slow fusion's weights are FC6/FC7, which see one row per
        # clip; at batch 1 bf16 autocast spends more casting them than it saves.
        "slowfusion": ModelSize("full", {}, 8, "full preset, 10x170x170"),
        "i3d": ModelSize(
            "kinetics", {"frames": 16, "crop_size": 112}, 1, "kinetics widths (width 1), 16x112x112"
        ),
        "vivit": ModelSize(
            "vivit-b",
            {"frames": 4, "image_size": [224, 224], "spatial_depth": 4, "temporal_depth": 2},
            1,
            "vivit-b widths (768/12 heads/MLP 3072), depth 4+2, 4x224x224",
        ),
    },
    "full": {
        "slowfusion": ModelSize("full", {}, 1, "full preset, 10x170x170"),
        "i3d": ModelSize("kinetics", {}, 1, "kinetics preset, 64x224x224"),
        "vivit": ModelSize("vivit-b", {}, 1, "vivit-b preset, 32x224x224"),
    },
}


@dataclass
class StepResult:
    """Timings (seconds per step) and FLOPs of one backbone at one size."""

    backbone: str
    size: str
    flops: float
    times: dict[str, float]


# -- measuring ------------------------------------------------------------------------


def matmul_peak(n: int, repeat: int, clock: str = "wall") -> dict[str, float]:
    """GFLOP/s of an ``n x n`` matmul in fp32 and bf16 (median of ``repeat``, interleaved, after warm-up)."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    t = time_interleaved({"fp32": lambda: a32 @ b32, "bf16": lambda: a16 @ b16}, warmup=2, repeat=repeat, clock=clock)
    return {k: 2 * n**3 / v / 1e9 for k, v in t.items()}


def conv3d_ratios(quick: bool, repeat: int, clock: str = "wall") -> tuple[str, dict[str, float], float]:
    """Time one Conv3d forward+backward in fp32/bf16 (autocast) x contiguous/channels_last_3d.

    Returns a description of the layer, seconds per call by variant, and the FLOPs of one call.
    """
    c, t, hw, batch = (32, 4, 28, 2) if quick else (64, 8, 28, 2)
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(c, c, 3, padding=1)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last_3d)
    x = torch.randn(batch, c, t, hw, hw, requires_grad=True)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)

    def call(module: torch.nn.Module, inp: torch.Tensor, bf16: bool) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            inp.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = module(inp)
            y.float().sum().backward()

        return run

    variants = {
        "fp32": call(conv, x, False),
        "bf16": call(conv, x, True),
        "fp32_cl": call(conv_cl, x_cl, False),
        "bf16_cl": call(conv_cl, x_cl, True),
    }
    flops = 3 * 2 * c * c * 27 * batch * t * hw * hw  # forward + grad input + grad weight
    desc = f"Conv3d {c}->{c} k3 on {batch}x{c}x{t}x{hw}x{hw}"
    return desc, time_interleaved(variants, warmup=1, repeat=repeat, clock=clock), flops


def build_training_step(
    name: str, size: ModelSize, channels_last: bool = False
) -> tuple[Callable[[bool], None], torch.nn.Module, torch.Tensor]:
    """A closure running one training step (policy ``all``, SGD) of a fresh model.

    The closure takes ``bf16`` (run forward and loss under bf16 autocast). Also
    returns the model and the fixed input clip, for FLOP counting.
    """
    torch.manual_seed(0)
    model = build_backbone(name, size.preset, num_classes=NUM_CLASSES, **size.overrides)
    apply_policy(model, resolve_policy(model, "all"))
    set_train_mode(model, True)
    pre = model.preprocessing
    x = torch.randn(size.batch, 3, pre.frames, *pre.crop_size)
    y = torch.arange(size.batch) % NUM_CLASSES
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step(bf16: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step, model, x


def inference_pass(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running one fp32 evaluation forward (eval mode, ``inference_mode``) of ``model`` on ``x``."""

    def run() -> None:
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            model(x)
        model.train(was_training)

    return run


def step_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Model FLOPs of one forward+backward in fp32.

    Counted with the math attention backend: the CPU flash-attention kernel has
    no FLOP formula, the math path's batched matmuls do (and are the model FLOPs).
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_backbone(
    name: str, size_name: str, warmup: int, repeat: int, batch: int | None = None, clock: str = "wall"
) -> StepResult:
    """Time one backbone's training step in every variant (fp32, bf16, and channels_last_3d for CNNs).

    ``batch`` overrides the size's batch (``--quick`` uses 1).
    """
    size = CONFIGS[size_name][name]
    if batch is not None:
        size = dataclasses.replace(size, batch=batch)
    step, model, x = build_training_step(name, size)
    flops = step_flops(model, x)
    variants: dict[str, Callable[[], None]] = {"fp32": lambda: step(False), "bf16": lambda: step(True)}
    if name in CNNS:
        step_cl, model_cl, x_cl = build_training_step(name, size, channels_last=True)
        variants["fp32_cl"] = lambda: step_cl(False)
        variants["bf16_cl"] = lambda: step_cl(True)
        variants["eval"] = inference_pass(model, x)
        variants["eval_cl"] = inference_pass(model_cl, x_cl)
    return StepResult(name, size_name, flops, time_interleaved(variants, warmup=warmup, repeat=repeat, clock=clock))


# -- profiling ------------------------------------------------------------------------

CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("attention", ("scaled_dot_product",)),
    ("conv", ("convolution",)),
    ("casts/copies", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("norm/activation/softmax", ("layer_norm", "gelu", "softmax", "batch_norm", "relu")),
    ("optimizer/grad accumulation", ("aten::add_", "aten::mul_", "aten::zero_", "aten::fill_")),
)


def _category(op: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k == op or (not k.startswith("aten::") and k in op) for k in keys):
            return cat
    return "other"


def profile_categories(step: Callable[[bool], None], runs: int = 3) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds of one training step by op category, fp32 and bf16.

    Each is the median over ``runs`` profiled steps, fp32 and bf16 profiled
    alternately, so a step descheduled mid-op (a shared machine) neither
    inflates one category nor one precision.
    """
    from torch.profiler import ProfilerActivity, profile

    per_run: dict[str, list[dict[str, float]]] = {"fp32": [], "bf16": []}
    step(False)
    step(True)
    for _ in range(runs):
        for label in per_run:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(label == "bf16")
            totals: dict[str, float] = {}
            for ev in prof.key_averages():
                cat = _category(ev.key)
                totals[cat] = totals.get(cat, 0.0) + ev.self_cpu_time_total / 1e3
            per_run[label].append(totals)
    out = {}
    for label, runs_ in per_run.items():
        cats = {c for t in runs_ for c in t}
        out[label] = {c: statistics.median(t.get(c, 0.0) for t in runs_) for c in cats}
    return out


def print_profile(size_name: str) -> None:
    """Print where one vivit training step spends its time, fp32 next to bf16."""
    step, _, _ = build_training_step("vivit", CONFIGS[size_name]["vivit"])
    cats_ms = profile_categories(step)
    fp32, bf16 = cats_ms["fp32"], cats_ms["bf16"]
    print(f"\nvivit {size_name} step, self CPU ms by op category (torch.profiler, median of 3 steps; the")
    print("  profiler's per-op times are elapsed times: compare shares, not totals, with the table above):")
    print(f"  {'category':30s} {'fp32':>9s} {'bf16':>9s} {'fp32/bf16':>10s}")
    cats = [c for c, _ in CATEGORIES] + ["other"]
    for cat in cats + ["total"]:
        a = sum(fp32.values()) if cat == "total" else fp32.get(cat, 0.0)
        b = sum(bf16.values()) if cat == "total" else bf16.get(cat, 0.0)
        ratio = f"{a / b:9.2f}x" if b > 0 else f"{'-':>10s}"
        print(f"  {cat:30s} {a:9.1f} {b:9.1f} {ratio}")


# -- reporting ------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def cpu_isa_line() -> str:
    """CPU model and the bf16-relevant instruction sets (``avx512_bf16``, ``amx_bf16``)."""
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"CPU: {model}; bf16-relevant ISA: {', '.join(isa) or 'none found'}; torch {torch.__version__}"


def print_step_result(r: StepResult, peak: dict[str, float]) -> None:
    """Print one backbone line (and the channels_last_3d line for CNNs)."""
    t = r.times
    gf32, gf16 = r.flops / t["fp32"] / 1e9, r.flops / t["bf16"] / 1e9
    print(
        f"{r.backbone} {r.size}: fp32 {_ms(t['fp32'])}, bf16 {_ms(t['bf16'])}, ratio {t['fp32'] / t['bf16']:.2f}x, "
        f"MFU fp32 {100 * gf32 / peak['fp32']:.0f}% bf16 {100 * gf16 / peak['bf16']:.0f}% "
        f"({r.flops / 1e9:.2f} GFLOP/step; {gf32:.1f} / {gf16:.1f} GFLOP/s)"
    )
    if "fp32_cl" in t:
        print(
            f"{r.backbone} {r.size} channels_last_3d: fp32 {_ms(t['fp32_cl'])} "
            f"(contiguous/channels_last {t['fp32'] / t['fp32_cl']:.2f}x), bf16 {_ms(t['bf16_cl'])} "
            f"(contiguous/channels_last {t['bf16'] / t['bf16_cl']:.2f}x; "
            f"fp32/bf16 ratio {t['fp32_cl'] / t['bf16_cl']:.2f}x)"
        )
        print(
            f"{r.backbone} {r.size} inference fp32: contiguous {_ms(t['eval'])}, channels_last_3d {_ms(t['eval_cl'])} "
            f"(contiguous/channels_last {t['eval'] / t['eval_cl']:.2f}x)"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse options, run the measurements and print the table."""
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default=None, help=f"comma-separated sizes from {', '.join(SIZES)} (default tiny,mid; --quick: tiny)"
    )
    parser.add_argument(
        "--backbones", default=",".join(BACKBONES), help=f"comma-separated backbones (default {','.join(BACKBONES)})"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed steps per variant (median; default 5, --quick 1, full i3d/vivit 1)",
    )
    parser.add_argument("--profile", action="store_true", help="also break one vivit step down by op category")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, robust to other users' load "
        "(use with --threads 1: with more threads it counts OpenMP spin-waiting too)",
    )
    args = parser.parse_args(argv)

    sizes = [s.strip() for s in (args.sizes or ("tiny" if args.quick else "tiny,mid")).split(",") if s.strip()]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    for s in sizes:
        if s not in SIZES:
            parser.error(f"--sizes: unknown size {s!r}; choose from {', '.join(SIZES)}")
    for b in backbones:
        if b not in BACKBONES:
            parser.error(f"--backbones: unknown backbone {b!r}; choose from {', '.join(BACKBONES)}")
    threads = setup_threads(args.threads)
    repeat = args.repeat or (1 if args.quick else 5)

    start = time.perf_counter()
    print(f"bench_step: threads {threads}, clock {args.clock}, {load_line()}")
    print(cpu_isa_line())
    n = 1024 if args.quick else 2048
    peak = matmul_peak(n, repeat=3 if args.quick else 7, clock=args.clock)
    print(
        f"matmul peak {n}x{n}: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s "
        f"(bf16/fp32 {peak['bf16'] / peak['fp32']:.2f}x)"
    )
    desc, ct, cflops = conv3d_ratios(args.quick, repeat=3 if args.quick else 5, clock=args.clock)
    print(
        f"conv3d fwd+bwd ({desc}): fp32 {_ms(ct['fp32'])} ({cflops / ct['fp32'] / 1e9:.1f} GFLOP/s), "
        f"bf16 {_ms(ct['bf16'])} ({cflops / ct['bf16'] / 1e9:.1f} GFLOP/s), "
        f"ratio fp32/bf16 {ct['fp32'] / ct['bf16']:.2f}x; channels_last_3d ratio (contiguous/CL) "
        f"fp32 {ct['fp32'] / ct['fp32_cl']:.2f}x bf16 {ct['bf16'] / ct['bf16_cl']:.2f}x"
    )
    counts = f"median of {repeat}" + (f" (full i3d/vivit: {args.repeat or 1})" if "full" in sizes else "")
    print(f"\ntraining step (forward + backward + SGD, policy all), {counts}; ratio = fp32 time / bf16 time:")
    for size_name in sizes:
        for name in backbones:
            size = CONFIGS[size_name][name]
            print(f"  [{name} {size_name}: {size.description}, batch {1 if args.quick else size.batch}]")
            full = size_name == "full" and name != "slowfusion"
            result = bench_backbone(
                name,
                size_name,
                warmup=1 if (args.quick or full) else 2,
                repeat=(args.repeat or 1) if full else repeat,
                batch=1 if args.quick else None,
                clock=args.clock,
            )
            print_step_result(result, peak)
    if args.profile and "vivit" in backbones:
        print_profile("tiny" if args.quick else ("mid" if "mid" in sizes else sizes[-1]))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; {load_line()}")
    print(rss_line())


if __name__ == "__main__":
    main()
