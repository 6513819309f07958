"""Every command line the docs and the tool print works as printed (issue 12, items 2 and 7).

The lines come from README.md, recipes/README.md and benchmarks/README.md
(fenced blocks, split at ``&&``, and inline code) and from the hints in the
tool's own string literals (``vtransfer ...``, ``pass --overwrite``). Each
documented line is a key of :data:`DOCUMENTED`, each hint a key of
:data:`HINTS` or :data:`OVERWRITE_HINTS`: a line or hint that appears without
an entry fails the ``*_knows_*`` tests, so the docs cannot drift.

They run in a workspace that holds what they name (``DATA``, ``cats.csv``,
``clip1.mp4``, ``UCF-101``, ``recipes/``), as the working directory, on tiny
synthetic videos, in-process with ``CliRunner``:

* ``run``: the line as printed (a few placeholders from :data:`PLACEHOLDERS`
  filled in), plus options appended to keep it small (1 epoch, 4 frames of
  32 px, one clip per video); it must exit 0 and leave what it promises.
* ``offline``: the line downloads weights. It runs with VTRANSFER_OFFLINE=1 and
  must stop before any work with the offline hint, which must name the file
  where ``vtransfer weights list`` looks for it.
* ``parse``: ``torchrun`` lines start several processes (one also needs CUDA;
  tests/test_distributed.py runs two gloo processes). torchrun's own parser
  reads the launcher part; the vtransfer part must parse with every option
  converted, and its subcommand's ``--help`` must work.
* ``benchmark``: ``python benchmarks/...`` lines take minutes (their ``--quick``
  runs are in tests/test_benchmarks.py); the script's own argparse parser must
  accept the arguments as printed.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import typer
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from videos import write_video

# The Karpathy recipe says preset = "full"; its stand-in weights are a tiny slow fusion, which wins, with this warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from preset 'full'; the preset was ignored:UserWarning")

vtransfer.cli._register_commands()
REPO = Path(__file__).resolve().parents[1]
DOC_FILES = ("README.md", "recipes/README.md", "benchmarks/README.md")
RUNNER = CliRunner()

# Appended to training commands: 1 epoch of 4-frame 32 px clips, frames decoded once into memory.
SMALL = ("--epochs", "1", "--frames", "4", "--size", "32", "--clips-per-video", "1", "--val-clips", "1",
         "--device", "cpu", "--cache", "memory", "--threads", "2")
PRETRAIN = "vtransfer pretrain /data/UCF-101 --backbone vivit --name vivit:my-ucf101"
KARPATHY = ("vtransfer compare-policies UCF-101 --recipe recipes/karpathy-ucf101.toml "
            "--split-files ucfTrainTestlist/trainlist01.txt")


@dataclass(frozen=True)
class How:
    """How this file runs one command line (the kinds are in the module docstring)."""

    kind: str = "run"
    extra: tuple[str, ...] = ()  # options appended to keep it small, never replacing what is printed
    needs: tuple[str, ...] = ()  # lines that must have run first (they register weights, write runs/X)
    check: Callable[[Any, Any], None] | None = None  # (workspace, result) -> assertions beyond exit code 0
    why: str = ""  # offline / parse: why it is not run to the end
    ctrl_c_in: str = ""  # compare-policies: press Ctrl-C in this policy, then resume as the message says


# -- what each line must leave behind ----------------------------------------------------


def _demo_compared(ws, result) -> None:
    rows = json.loads((ws.root / "demo-run" / "compare" / "compare.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["top-layer"]


def _all_videos_usable(ws, result) -> None:
    assert "12 of 12 videos usable" in result.output


def _audited(ws, result) -> None:
    audit = json.loads((ws.root / "audit" / "audit.json").read_text())
    assert audit["videos"] == 12 and audit["duplicates"]["pairs_compared"] > 0 and audit["skipped"] == []


def _audited_labels(ws, result) -> None:
    assert "label audit: confident learning" in " ".join(result.output.split())


def _trained(run: str) -> Callable[[Any, Any], None]:
    def check(ws, result) -> None:
        assert (ws.root / run / "model.safetensors").is_file() and (ws.root / run / "report" / "report.json").is_file()
    return check


def _evaluated_the_runs_test_split(ws, result) -> None:
    report = json.loads((ws.root / "report" / "report.json").read_text())
    with open(ws.root / "runs" / "X" / "split.csv") as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    assert report["num_videos"] == len(test_rows) == 3
    # 3 classes: hit@k is hit@3, and its key says so
    assert report["top_k"] == 3 and report["summary"]["video_hit3"] == 1.0 and "video_hit5" not in report["summary"]


def _predicted_both_clips(ws, result) -> None:
    assert "clip1.mp4" in result.output and "clip2.avi" in result.output and "cannot decode" not in result.output


def _registered(name: str) -> Callable[[Any, Any], None]:
    def check(ws, result) -> None:
        listed = {s["name"]: s for s in json.loads(ws.ok(["weights", "list", "--json"]).stdout)}
        assert listed[name]["present"], listed[name]
    return check


def _pretrain_prints_the_hint_below(ws, result) -> None:
    _registered("vivit:my-ucf101")(ws, result)
    printed = " ".join(result.output.split()).split("use it with: ", 1)[1]
    assert printed == PRETRAIN_HINT  # HINT_LINES runs it


def _resumed(ws, result) -> None:
    epochs = [json.loads(line)["epoch"] for line in (ws.root / "runs" / "R" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and (ws.root / "runs" / "R" / "report" / "report.json").is_file()


def _compared_every_policy_of_the_recipe(ws, result) -> None:
    out = re.search(r"results: (\S+)", result.output).group(1)
    rows = json.loads((ws.root / out / "compare.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["scratch", "top-layer", "top-3", "all"] and "skipped" not in result.output


def _make_demo_hint_printed(ws, result) -> None:
    missing = ws.invoke(["make-demo"])
    assert missing.exit_code == 2 and "try `vtransfer make-demo demo-data`" in missing.output
    assert (ws.root / "demo-data" / "categories.csv").is_file()


def _no_output_and_offline_hint(source: str) -> Callable[[Any, Any], None]:
    """The download fails at once, names where the tool looks for the file, and leaves nothing behind."""

    def check(ws, result) -> None:
        from vtransfer.utils.errors import WeightsError

        message = str(result.exception)
        assert isinstance(result.exception, WeightsError), result.output
        expected = {s["name"]: s for s in json.loads(ws.ok(["weights", "list", "--json"]).stdout)}[source]["path"]
        assert re.fullmatch(r"could not download \S+ \(offline mode: VTRANSFER_OFFLINE is set\)\. "
                            r"Offline\? Download it elsewhere and put it at (\S+)", message).group(1) == expected
    return check


def _extracted_features(ws, result) -> None:
    from safetensors import safe_open

    with safe_open(str(ws.root / "features.safetensors"), "pt") as f:
        videos, clips = f.get_tensor("video_embeddings"), f.get_tensor("clip_embeddings")
    with open(ws.root / "features.csv") as f:
        index = list(csv.DictReader(f))
    assert videos.shape[0] == len(index) == 12 and clips.shape[0] >= 12 and videos.shape[1] == clips.shape[1]


def _exported_onnx(ws, result) -> None:
    assert (ws.root / "model.onnx").is_file() and (ws.root / "model.onnx.preprocessing.json").is_file()


def _explained(ws, result) -> None:
    report = json.loads((ws.root / "explain" / "explain.json").read_text())
    (video,) = report["videos"]
    assert video["png"] == "clip1.png" and video["gif"] == "clip1.gif" and not report["skipped"]
    assert (ws.root / "explain" / "clip1.png").is_file() and (ws.root / "explain" / "clip1.gif").is_file()
    assert video["method"] == "grad-cam" and len(video["temporal"]["importance"]) == 4  # 4-frame clips (SMALL)


PRETRAIN_HINT = "vtransfer finetune DATA --backbone vivit --weights runs/P/model.safetensors"

DOCUMENTED: dict[str, How] = {
    # README.md
    "vtransfer demo": How(extra=("--recipe", "demo-tiny.toml"), check=_demo_compared),
    "vtransfer check DATA": How(check=_all_videos_usable),
    "vtransfer check DATA --audit --out audit/": How(check=_audited),
    "vtransfer check DATA --audit --backbone effnet3d --weights effnet3d:imagenet":
        How(extra=("--preset", "tiny"), check=_audited_labels),
    "vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-3":
        How(extra=("--preset", "tiny", *SMALL, "--out", "runs/X"), check=_trained("runs/X")),
    "vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-layer --stream flow":
        How(extra=("--preset", "tiny", *SMALL, "--out", "runs/F"), check=_trained("runs/F")),
    "vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-layer --stream two-stream":
        How(extra=("--preset", "tiny", *SMALL, "--out", "runs/T"), check=_trained("runs/T")),
    "vtransfer finetune DATA --backbone effnet3d --max-memory 6G":
        How(extra=("--preset", "tiny", *SMALL, "--out", "runs/M"), check=_trained("runs/M")),
    "vtransfer finetune DATA --backbone vivit --policy temporal --weights vivit:imagenet":
        How("offline", check=_no_output_and_offline_hint("vivit:imagenet"),
            why="downloads torchvision's ViT-B/16 (330 MB)"),
    "vtransfer evaluate runs/X DATA --out report/": How(
        extra=("--clips-per-video", "1"), check=_evaluated_the_runs_test_split,
        needs=("vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-3",)),
    "vtransfer compare-policies DATA --backbone i3d --weights i3d:kinetics400 --categories cats.csv":
        How("offline", check=_no_output_and_offline_hint("i3d:kinetics400"), why="downloads the Kinetics-400 I3D"),
    "vtransfer predict runs/X/model.safetensors clip1.mp4 clip2.avi": How(
        extra=("--clips-per-video", "1"), check=_predicted_both_clips,
        needs=("vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-3",)),
    "vtransfer extract-features runs/X DATA --out features --per-clip": How(
        extra=("--clips-per-video", "1"), check=_extracted_features,
        needs=("vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-3",)),
    "vtransfer export runs/X --format onnx --out model.onnx": How(
        check=_exported_onnx, needs=("vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-3",)),
    "vtransfer explain runs/X clip1.mp4 --out explain/": How(
        check=_explained, needs=("vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-3",)),
    "vtransfer backbones": How(check=lambda ws, r: assert_in(("effnet3d", "vivit:imagenet"), r.output)),
    "vtransfer inspect --backbone i3d --policy temporal": How(check=lambda ws, r: assert_in(("policy temporal: trains",), r.output)),
    "vtransfer inspect --backbone vivit --preset b16x2-fe --policy lora":
        How(check=lambda ws, r: assert_in(("policy lora: trains 1,880,464 of 116,635,792 parameters (1.61%)",), r.output)),
    PRETRAIN: How(extra=("--preset", "tiny", *SMALL, "--out", "runs/P"), check=_pretrain_prints_the_hint_below),
    "vtransfer finetune DATA --backbone vivit --weights vivit:my-ucf101 --policy temporal":
        How(extra=(*SMALL, "--out", "runs/V"), needs=(PRETRAIN,), check=_trained("runs/V")),
    "vtransfer weights list": How(check=lambda ws, r: assert_in(("effnet3d:imagenet",), r.output)),
    "vtransfer finetune --resume RUN": How(check=_resumed),
    "torchrun --nproc_per_node 2 -m vtransfer finetune DATA --backbone i3d --policy all --batch-size 16":
        How("parse", why="starts 2 processes"),
    "torchrun --nnodes 2 --nproc_per_node 4 --node_rank 0 --master_addr HOST0 --master_port 29500 -m vtransfer "
    "finetune DATA --backbone vivit --policy temporal --batch-size 64 --device cuda":
        How("parse", why="two machines with 4 GPUs each"),
    # recipes/README.md: the recipe's UCF-101 categories name 101 classes, the stand-in has 3
    KARPATHY: How(extra=("--size", "32", "--epochs", "1", "--clips-per-video", "1", "--val-clips", "1", "--device", "cpu",
                         "--cache", "memory", "--threads", "2", "--categories", "cats.csv"),
                  needs=("vtransfer weights add FILE --name slowfusion:my-sports1m",),
                  check=_compared_every_policy_of_the_recipe, ctrl_c_in="all"),
}
"""Every ``vtransfer``/``torchrun`` line of the docs (``python benchmarks/`` lines are all run one way)."""

HINT_LINES: dict[str, How] = {
    "vtransfer make-demo demo-data": How(extra=("-n", "2", "--frames", "4", "--size", "16", "--classes", "striped,ring"),
                                         check=_make_demo_hint_printed),
    "vtransfer split DATA --out split.csv": How(),
    "vtransfer weights add FILE --name slowfusion:my-sports1m": How(check=_registered("slowfusion:my-sports1m")),
    PRETRAIN_HINT: How(extra=SMALL, needs=(PRETRAIN,)),
}
"""Lines only the tool prints (as hints, with the placeholder filled in as a user would)."""

COMMANDS = {**DOCUMENTED, **HINT_LINES}

PLACEHOLDERS: dict[str, Callable[[Any], str]] = {
    "/data/UCF-101": lambda ws: "UCF-101",  # an absolute path the test cannot create: the UCF-shaped stand-in
    "RUN": lambda ws: ws.interrupted_run(),  # a run stopped by Ctrl-C in its second epoch
    "FILE": lambda ws: ws.source_checkpoint(),  # a tiny slow fusion standing in for Sports-1M weights
}

HINTS: dict[str, str] = {
    # hint as the string literal reads ({…}: a value filled in) -> the line or test that runs it
    "vtransfer finetune --resume {…}": "vtransfer finetune --resume RUN",
    "vtransfer {…} command and --out {…}": "test_the_compare_policies_resume_hint_reuses_finished_policies",
    "vtransfer finetune DATA --backbone {…} --weights {…}": PRETRAIN_HINT,
    "vtransfer pretrain DATA --backbone {…}": PRETRAIN,
    "vtransfer pretrain DATA --backbone ...": PRETRAIN,
    "vtransfer pretrain": PRETRAIN,
    "vtransfer weights add": "vtransfer weights add FILE --name slowfusion:my-sports1m",
    "vtransfer weights add FILE --name NAME": "vtransfer weights add FILE --name slowfusion:my-sports1m",
    "vtransfer weights list": "vtransfer weights list",
    "vtransfer backbones": "vtransfer backbones",
    "vtransfer inspect --backbone NAME": "vtransfer inspect --backbone i3d --policy temporal",
    "vtransfer check": "vtransfer check DATA",
    "vtransfer split": "vtransfer split DATA --out split.csv",
    "vtransfer make-demo": "vtransfer make-demo demo-data",
    "vtransfer make-demo demo-data": "vtransfer make-demo demo-data",
    "vtransfer demo dataset": "",  # the first words of make-demo's README.txt, not a command
    "vtransfer {…}": "",  # what --version prints
}

OVERWRITE_HINTS: dict[str, str] = {
    # the refusal as the string literal reads -> the line whose second run prints it
    "run folder {…} already exists and is not empty; pass --overwrite or choose another --out":
        "vtransfer finetune DATA --backbone vivit --weights vivit:my-ucf101 --policy temporal",
    "output folder {…} is not empty; pass --overwrite or choose another --out": "vtransfer evaluate runs/X DATA --out report/",
    "--out {…} already exists; pass --overwrite to replace it": "vtransfer split DATA --out split.csv",
    "{…}: folder is not empty; choose an empty folder or pass --overwrite": "vtransfer make-demo demo-data",
}


def assert_in(needles: tuple[str, ...], text: str) -> None:
    """Each of ``needles`` occurs in ``text``."""
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text[-3000:]}"


# -- reading the docs and the code --------------------------------------------------------


def _command_lines(text: str) -> list[str]:
    """Command lines in a Markdown text: fenced-block lines (continuations joined, comments cut, split
    at ``&&``) and inline code, kept when they start with vtransfer, torchrun or a benchmark script."""
    found = []
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in fenced:
        for line in block.replace("\\\n", " ").splitlines():
            found += line.split(" #", 1)[0].split("&&")
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    found += re.findall(r"`([^`\n]+)`", prose)
    lines = (" ".join(c.split()) for c in found)
    return list(dict.fromkeys(c for c in lines if re.match(r"(vtransfer |torchrun |(python )?benchmarks/\S+\.py\b)", c)))


def documented_lines() -> list[str]:
    """Every command line of :data:`DOC_FILES`, in order of appearance, each once."""
    lines: list[str] = []
    for name in DOC_FILES:
        lines += _command_lines((REPO / name).read_text())
    return list(dict.fromkeys(lines))


def printed_strings() -> list[tuple[str, str]]:
    """``(file:line, text)`` of each string literal of the package except docstrings; values that are
    filled in (f-string fields, ``str.format`` fields) read ``{…}``."""
    out = []
    for path in sorted((REPO / "vtransfer").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    skip.add(id(first.value))
            if isinstance(node, ast.JoinedStr):
                skip |= {id(v) for v in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{…}" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                text = re.sub(r"\{[^{}]*\}", "{…}", node.value)
            else:
                continue
            out.append((f"{path.relative_to(REPO)}:{node.lineno}", text))
    return out


def command_names() -> set[str]:
    """Every command as typed after ``vtransfer`` (``check``, ``weights add``, ...)."""
    names = set()

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            names.add(prefix + name)
            if hasattr(cmd, "commands"):
                walk(cmd, prefix + name + " ")
    walk(typer.main.get_command(app), "")
    return names


def printed_hints() -> dict[str, str]:
    """``{hint: where}`` for each ``vtransfer <command> ...`` the package's strings print."""
    token = r"(?:--?[\w-]+|\{…\}|[\w:./-]+)"
    pattern = re.compile(rf"vtransfer ((?:weights )?[a-z][a-z-]*|\{{…\}})((?: {token})*)")
    names = command_names() | {"{…}"}
    hints = {}
    for where, text in printed_strings():
        for m in pattern.finditer(text):
            if m.group(1) in names:
                hints.setdefault(re.sub(r"(?<=\w)\.$", "", f"vtransfer {m.group(1)}{m.group(2)}"), where)  # a full stop
    return hints


def instance_of(hint: str, line: str) -> bool:
    """True when ``line`` starts with the words of ``hint``, where a placeholder (``DATA``, ``NAME``,
    ``...``, ``{…}``) stands for any one word."""
    words, given = hint.split(), line.split()
    placeholder = re.compile(r"[A-Z][A-Z0-9_]*|\.\.\.|\{…\}")
    return len(given) >= len(words) and all(w == g or placeholder.fullmatch(w) for w, g in zip(words, given))


# -- the workspace ---------------------------------------------------------------------------


class Workspace:
    """The folder the commands run in (their working directory) and what they have left there."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, Any] = {}
        self._interrupted: str | None = None
        self.resume_hint: str | None = None
        self.stopped: dict[str, dict[str, int]] = {}  # line -> {policy: model mtime} when Ctrl-C stopped it

    def invoke(self, argv: list[str]):
        """``vtransfer ARGV`` in-process (exceptions are kept on the result, as the real entry point would print them)."""
        return RUNNER.invoke(app, [str(a) for a in argv])

    def ok(self, argv: list[str]):
        """:meth:`invoke` that must exit 0."""
        result = self.invoke(argv)
        if result.exit_code != 0:
            raise AssertionError(f"`vtransfer {shlex.join(map(str, argv))}` exited {result.exit_code}:\n"
                                 f"{result.output[-4000:]}") from result.exception
        return result

    def argv(self, line: str) -> list[str]:
        """The words of ``line`` after ``vtransfer``, placeholders filled in, then its ``extra`` options."""
        words = [PLACEHOLDERS[w](self) if w in PLACEHOLDERS else w for w in shlex.split(line)]
        assert words[0] == "vtransfer", line
        return [*words[1:], *COMMANDS[line].extra]

    def run(self, line: str):
        """Run ``line`` as :data:`COMMANDS` says, once (later calls return the first result)."""
        if line not in self.results:
            how = COMMANDS[line]
            for need in how.needs:
                self.run(need)
            if how.kind == "offline":
                before = self.listing()
                result = self.invoke(self.argv(line))
                assert result.exit_code != 0 and self.listing() == before  # stopped before writing anything
            elif how.ctrl_c_in:
                result = self._stop_then_resume(line, how.ctrl_c_in)
            else:
                result = self.ok(self.argv(line))
            if how.check is not None:
                how.check(self, result)
            self.results[line] = result
        return self.results[line]

    def listing(self) -> list[str]:
        """What is in the workspace and in its ``runs/`` folder."""
        return sorted(str(p.relative_to(self.root)) for p in (*self.root.iterdir(), *self.root.glob("runs/*")))

    def _stop_then_resume(self, line: str, policy: str):
        """Run ``line`` with Ctrl-C in ``policy``'s first batch, then the command the message says resumes it."""
        from vtransfer.workflows import runs
        from vtransfer.reporting.progress import RichReporter

        def ctrl_c_in_policy(reporter, loss, acc):
            if reporter.label.startswith(f"[{policy} "):
                raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(RichReporter, "batch_end", ctrl_c_in_policy)
            stopped = self.invoke(self.argv(line))
        assert isinstance(stopped.exception, runs.RunInterrupted), stopped.output
        said = re.fullmatch(r"interrupted; resume with the same vtransfer (\S+) command and --out (\S+) \(.*",
                            str(stopped.exception))
        assert said and said.group(1) == shlex.split(line)[1], str(stopped.exception)
        out = self.root / said.group(2)
        self.stopped[line] = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
        return self.ok([*self.argv(line), "--out", said.group(2)])

    def source_checkpoint(self) -> str:
        """A random-init tiny slow fusion saved as a vtransfer checkpoint (stands in for pretrained weights)."""
        path = self.root / "sports1m.safetensors"
        if not path.exists():
            import torch

            from vtransfer.models.registry import build_backbone
            from vtransfer.weights.checkpoint import save_checkpoint

            torch.manual_seed(0)
            model = build_backbone("slowfusion", "tiny", num_classes=5, input_size=32)
            save_checkpoint(path, model, classes=[f"src{i}" for i in range(5)], source={"dataset": "synthetic-source"})
        return path.name

    def interrupted_run(self) -> str:
        """``runs/R``: a slow-fusion run stopped by Ctrl-C in epoch 2 of 2; keeps the hint it printed."""
        if self._interrupted is None:
            import vtransfer.api as api
            from vtransfer.workflows import runs

            with pytest.raises(runs.RunInterrupted) as stopped:
                api.finetune("DATA", out="runs/R", backbone="slowfusion", preset="tiny", size=32, epochs=2,
                             clips_per_video=1, val_clips=1, device="cpu", cache="memory", threads=2,
                             reporter=_CtrlCInEpoch(2))
            self.resume_hint = str(stopped.value).split("resume with ", 1)[1].split(" (", 1)[0]
            self._interrupted = "runs/R"
        return self._interrupted


class _CtrlCInEpoch:
    """A progress reporter that raises KeyboardInterrupt (as Ctrl-C does) at the first batch of ``epoch``."""

    def __init__(self, epoch: int):
        self.stop_at, self.epoch = epoch, 0

    def epoch_start(self, epoch, epochs, batches):  # noqa: D102
        self.epoch = epoch

    def batch_end(self, loss, acc):  # noqa: D102
        if self.epoch == self.stop_at:
            raise KeyboardInterrupt

    def epoch_end(self, record, improved):  # noqa: D102
        pass

    def message(self, text):  # noqa: D102
        pass


@pytest.fixture(scope="module")
def ws(tmp_path_factory, demo_datasets):
    """The workspace: DATA (3 classes x 4 videos), cats.csv, clip1.mp4, clip2.avi, a UCF-101-shaped copy
    with its split lists, ``recipes/``; VTRANSFER_HOME inside it, offline, as the working directory."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(demo_datasets("DATA", class_set="target", classes=["striped", "ring", "move_up"], videos_per_class=4,
                                  frames=12, size=32, seed=3), root / "DATA")
    shutil.copy(root / "DATA" / "categories.csv", root / "cats.csv")
    shutil.copy(root / "DATA" / "ring" / "ring_000.mp4", root / "clip1.mp4")
    write_video(root / "clip2.avi", 12, width=32, height=32, codec="mpeg4")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    train, test = [], []
    for label, name in enumerate(("striped", "ring", "move_up"), start=1):
        for group in range(1, 5):
            video = root / "UCF-101" / name / f"v_{name}_g{group:02d}_c01.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "DATA" / name / f"{name}_{group - 1:03d}.mp4", video)
            entry = f"{name}/{video.name}"
            test.append(entry) if group == 1 else train.append(f"{entry} {label}")
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    (root / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    (root / "demo-tiny.toml").write_text(
        "[demo]\ntarget_videos_per_class = 3\ndemo_frames = 8\ndemo_size = 32\nframes = 4\nsize = 32\nepochs = 1\n"
        "clips_per_video = 1\nval_clips = 1\npolicies = ['top-layer']\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VTRANSFER_HOME", str(root / "home"))
        mp.setenv("VTRANSFER_OFFLINE", "1")
        mp.setenv("COLUMNS", "100")
        mp.chdir(root)
        yield Workspace(root)


# -- the docs and the hints are all known ----------------------------------------------------


def test_the_table_knows_every_documented_command():
    lines = documented_lines()
    unknown = [line for line in lines if line not in DOCUMENTED and not line.startswith("python benchmarks/")]
    assert not unknown, "documented but not in DOCUMENTED (add how to run it):\n" + "\n".join(unknown)
    stale = [line for line in DOCUMENTED if line not in lines]
    assert not stale, "in DOCUMENTED but no longer documented:\n" + "\n".join(stale)
    assert all(how.why for how in COMMANDS.values() if how.kind != "run"), "say why a line is not run to the end"


def test_the_table_knows_every_printed_hint():
    hints = printed_hints()
    unknown = {h: where for h, where in hints.items() if h not in HINTS}
    assert not unknown, "printed but not in HINTS (say which line or test runs it):\n" + "\n".join(
        f"{where}: {h}" for h, where in unknown.items())
    assert not [h for h in HINTS if h not in hints], "in HINTS but printed nowhere"
    for hint, target in HINTS.items():
        if target.startswith("test_"):
            assert callable(globals().get(target)), target
        elif target:
            assert target in COMMANDS and instance_of(hint, target), (hint, target)


def test_the_table_knows_every_overwrite_hint():
    printed = {text for _, text in printed_strings() if "pass --overwrite" in text}
    assert printed == set(OVERWRITE_HINTS)


def test_every_long_option_in_the_readmes_prose_exists():
    """``--group-pattern``, ``--cached-views K``: each option the README names in passing is one of a command's."""
    options = set()

    def walk(group):
        for cmd in group.commands.values():
            if hasattr(cmd, "commands"):
                walk(cmd)
            options.update(o for p in cmd.params for o in (*p.opts, *p.secondary_opts))
    walk(typer.main.get_command(app))
    options.add("--help")
    for name in ("README.md", "recipes/README.md"):
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", (REPO / name).read_text(), flags=re.S | re.M)
        spans = [s for s in re.findall(r"`([^`\n]+)`", prose) if s.startswith(("--", "vtransfer "))]  # not `pip ...`
        named = {o for span in spans for o in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)}
        assert named and named <= options, f"{name}: {sorted(named - options)}"


# -- every line runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("line", [*COMMANDS, *[line for line in documented_lines() if line.startswith("python ")]], ids=str)
def test_command_works_as_printed(ws, line, monkeypatch):
    if line.startswith("python benchmarks/"):
        return _parse_benchmark(line, monkeypatch)
    how = COMMANDS[line]
    if how.kind == "parse":
        return _parse_torchrun(line)
    ws.run(line)
    if "RUN" in line.split():
        assert ws.argv(line) == shlex.split(ws.resume_hint)[1:], "the doc line is the hint the interruption printed"


def _parse_torchrun(line: str) -> None:
    """torchrun's parser reads the launcher part; vtransfer's parses its part (every option converted)."""
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser().parse_args(shlex.split(line)[1:])
    assert launcher.module and launcher.training_script == "vtransfer"
    assert importlib.util.find_spec("vtransfer.__main__") is not None  # what `-m vtransfer` runs
    argv = launcher.training_script_args
    command = typer.main.get_command(app).commands[argv[0]]
    assert RUNNER.invoke(app, [argv[0], "--help"]).exit_code == 0
    ctx = command.make_context(f"vtransfer {argv[0]}", list(argv[1:]))
    assert ctx.params["data"] == Path("DATA") and ctx.params["batch_size"] == int(argv[argv.index("--batch-size") + 1])


class _Parsed(Exception):
    """Raised in place of running a benchmark once its arguments have parsed."""


def _parse_benchmark(line: str, monkeypatch) -> None:
    """The script's own ``main()`` parses the printed arguments, then stops before any work."""
    words = shlex.split(line)
    script = REPO / words[1]
    assert script.is_file(), line
    monkeypatch.syspath_prepend(str(script.parent))
    spec = importlib.util.spec_from_file_location(f"_documented_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *words[2:]])
    with pytest.raises(_Parsed) as parsed:
        module.main()
    if "DATA" in words:
        assert Path("DATA") in vars(parsed.value.args[0]).values()


# -- the hints the tool prints run as printed ------------------------------------------------------


@pytest.mark.parametrize("refusal", OVERWRITE_HINTS)
def test_an_overwrite_refusal_says_what_to_add_and_that_works(ws, refusal):
    line = OVERWRITE_HINTS[refusal]
    ws.run(line)
    again = ws.invoke(ws.argv(line))
    said = " ".join((str(again.exception or "") + " " + again.output).split())
    assert again.exit_code != 0
    assert re.search(re.escape(refusal).replace(re.escape("{…}"), r"\S+"), said), said
    ws.ok([*ws.argv(line), "--overwrite"])


def test_the_compare_policies_resume_hint_reuses_finished_policies(ws):
    """Ctrl-C in the last policy of the recipes README's line; the command the message names finishes it
    and reuses the policies that had finished (see ``Workspace._stop_then_resume``)."""
    result = ws.run(KARPATHY)
    finished = ws.stopped[KARPATHY]
    assert sorted(finished) == ["scratch", "top-3", "top-layer"]  # top-3 runs before top-layer: it feeds its cache
    out = ws.root / re.search(r"results: (\S+)", result.output).group(1)
    assert {p: (out / p / "model.safetensors").stat().st_mtime_ns for p in finished} == finished
    assert (out / "all" / "model.safetensors").is_file()


def test_workers_help_says_what_the_default_is(ws):
    """The default is picked per run: 0 with frames decoded in memory, and the help says so."""
    ws.run("vtransfer finetune DATA --backbone effnet3d --weights effnet3d:imagenet --policy top-3")
    config = json.loads((ws.root / "runs" / "X" / "config.json").read_text())
    assert config["options"]["workers"] is None and config["resolved"]["workers"] == 0
    text = " ".join(ws.ok(["finetune", "--help"]).output.replace("│", " ").split())
    workers = text.split("--workers", 1)[1].split("--threads", 1)[0]
    assert "often 0, decoding in the main process, when the frames are already decoded in memory" in workers
    assert "min(" not in workers


# -- help reads well -------------------------------------------------------------------------------


def _every_command() -> list[str]:
    return sorted(command_names())


@pytest.mark.parametrize("name", _every_command())
def test_help_shows_clean_names_and_no_python_types(name):
    result = RUNNER.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "<bool>" not in text and "<list[" not in text and not re.search(r"\{[a-z_]+\}", text), text
    assert max(len(line) for line in text.splitlines()) <= 100
    usage = re.search(r"Usage: vtransfer (.*)", text).group(1).split()
    assert " ".join(usage[: len(name.split())]) == name
    for word in usage[len(name.split()):]:
        assert re.fullmatch(r"\[OPTIONS\]|COMMAND|\[ARGS\]\.\.\.|\[?[A-Z][A-Z0-9_]*(\.\.\.)?\]?", word), (word, text)
    command = typer.main.get_command(app)
    for part in name.split():
        command = command.commands[part]
    for param in command.params:
        if param.param_type_name == "argument":  # named in capitals in the Arguments panel too
            assert re.search(rf"│ [* ] +{re.escape(param.metavar)} ", text), (param.metavar, text)
