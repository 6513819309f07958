"""Step time and peak memory of the parameter-efficient policies against ``all``, on ViViT.

For each preset (``tiny``, ``small``) and policy (``all``, ``lora``, ``adapter``,
``bitfit``, ``attentive-probe``), one training step (forward from the input,
backward, optimiser step) is timed and its peak memory measured, each variant
in a fresh process so one's allocations cannot hide another's. Step time is
the median of interleaved repeats; memory is the rise of peak RSS during the
step (``torch.cuda.max_memory_allocated`` with ``--device cuda``). A policy
with a frozen prefix runs that prefix without autograd, as training does.
Prints ratios to ``all`` measured in this one run.

    python benchmarks/bench_peft.py            # tiny and small, batch 8
    python benchmarks/bench_peft.py --quick    # tiny only, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import base_parser, load_line, median_time, rss_line, setup_threads

POLICIES = ("all", "lora", "adapter", "bitfit", "attentive-probe")
STEP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def measure(preset: str, policy: str, batch: int, device: str, repeat: int) -> dict:
    """Trainable parameters, median step time (s) and peak memory rise (MiB) of one training step."""
    import torch

    from bench_memory import step_peak_rise_mib
    from vtransfer.models.registry import build_backbone
    from vtransfer.policies.freezing import apply_policy, plan_policy, set_train_mode
    from vtransfer.engine.trainer import TrainablePart

    torch.manual_seed(0)
    model, plan = plan_policy(build_backbone("vivit", preset, num_classes=10), policy)
    apply_policy(model, plan)
    model.to(device)
    set_train_mode(model, True, policy)  # frozen modules (bitfit: every BatchNorm) in eval mode, as training does
    pre = model.preprocessing
    x = torch.randn(batch, 3, pre.frames, *pre.crop_size, device=device)
    labels = torch.arange(batch, device=device) % 10
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    part = TrainablePart(model, plan.first_trainable_group)
    dev = torch.device(device)

    def step() -> None:
        with torch.no_grad():
            h = model.forward_groups(x, 0, plan.first_trainable_group)
        torch.nn.functional.cross_entropy(part(h), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    return {"trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters()),
            "peak_mib": step_peak_rise_mib(step, dev), "time_s": median_time(step, warmup=0, repeat=repeat)}


def main() -> None:
    """Print the table: per preset, each policy's trainable share, step time and memory, and ratios to ``all``."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--presets", default=None, help="comma-separated vivit presets (default: tiny,small; --quick: tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step (default 8; --quick 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--_one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    repeat = 2 if args.quick else 5
    if args._one:
        preset, policy, batch = args._one
        print(json.dumps(measure(preset, policy, int(batch), args.device, repeat)))
        return
    print(load_line())
    presets = (args.presets or ("tiny" if args.quick else "tiny,small")).split(",")
    batch = args.batch_size or (2 if args.quick else 8)
    print(f"one training step of vivit (forward, backward, AdamW step), batch {batch}, {threads} threads, "
          f"device {args.device}; each row in its own process")
    print(f"{'preset':<8}{'policy':<17}{'trainable':>12}{'share':>8}{'step ms':>10}{'x all':>7}{'peak MiB':>10}{'x all':>7}")
    for preset in presets:
        rows = {}
        for policy in POLICIES:
            cmd = [sys.executable, __file__, "--_one", preset, policy, str(batch), "--threads", str(threads),
                   "--device", args.device] + (["--quick"] if args.quick else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **STEP_ENV})
            if done.returncode != 0:
                raise SystemExit(f"{preset} {policy} failed:\n{done.stderr[-2000:]}")
            rows[policy] = json.loads(done.stdout.strip().splitlines()[-1])
        ref = rows["all"]
        for policy, r in rows.items():
            print(f"{preset:<8}{policy:<17}{r['trainable']:>12,}{100 * r['trainable'] / r['total']:>7.2f}%"
                  f"{1000 * r['time_s']:>10.1f}{r['time_s'] / ref['time_s']:>7.2f}{r['peak_mib']:>10.1f}"
                  f"{r['peak_mib'] / max(ref['peak_mib'], 1e-9):>7.2f}", flush=True)
    print(rss_line())


if __name__ == "__main__":
    main()
