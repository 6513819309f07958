"""The package's layout holds: wings import down, no cycles, no private names across wings, imports at the top.

Read from the source with ``ast`` (nothing is imported), so a new module is
checked the moment it exists. README.md's "Layout" section explains the order.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vtransfer"

#: Wings from the bottom up: a module may import its own wing and the wings before it, never one after.
WING_ORDER = ("utils", "run_config", "data", "evaluation", "weights", "models", "policies", "loading", "engine", "reporting",
              "workflows", "api", "demo", "recipes", "cli", "__main__", "__init__")
#: Declarations any wing may read. Each imports nothing of vtransfer but ``utils`` and the other declarations.
DECLARATIONS = ("vtransfer.run_config", "vtransfer.policies.names", "vtransfer.data.flow_settings")

#: The imports allowed inside functions, and why. Everything else goes at the top of its module.
LAZY_IMPORTS = {
    # `vtransfer --help` and a mistyped command must answer without torch, av, numpy or matplotlib:
    # the CLI and the package root import the commands' work when a command runs.
    "vtransfer.cli": "start-up: commands import their work when they run",
    "vtransfer": "start-up: `import vtransfer` stays cheap; the API loads on first use",
    "vtransfer.recipes": "start-up: read by the CLI before any command runs",
    "vtransfer.demo": "start-up: its settings are read by the CLI's recipe handling",
    "vtransfer.utils.runtime": "start-up: sets thread variables before torch loads",
    "vtransfer.run_config": "start-up: the CLI builds its options from these declarations",
}
#: Third-party packages imported where used: optional extras (a missing one gets a message naming it),
#: or costly ones that only some paths need.
LAZY_PACKAGES = {
    "matplotlib": "0.4 s to import; only when a plot is written",
    "transformers": "optional: vtransfer[hf]",
    "peft": "optional: vtransfer[peft]",
    "onnx": "optional: vtransfer[export]",
    "onnxruntime": "optional: vtransfer[export]",
    "torch.utils.tensorboard": "optional: vtransfer[tensorboard]",
    "tensorboard": "optional: vtransfer[tensorboard]",
    "cv2": "optical flow and the jpeg frame cache only: opencv is needed by --stream flow and --cache-format jpeg",
    "efficientnet_lite_pytorch": "test extra: reference EfficientNet-Lite",
    "vit_pytorch": "test extra: reference ViViT",
    "huggingface_hub": "optional: comes with transformers",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[ast.stmt, str, list[str], bool]]:
    """(node, imported module, imported names, inside a function) for every vtransfer or third-party import."""
    tree = ast.parse(MODULES[module].read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name, [], id(node) in inside) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__" and not node.level:
            out.append((node, node.module, [a.name for a in node.names], id(node) in inside))
    return out


def _targets(imported: str, names: list[str]) -> set[str]:
    if not imported.startswith("vtransfer"):
        return set()
    targets = {_resolve(f"{imported}.{n}") for n in names} | {_resolve(imported)}
    return {t for t in targets if t}


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _level(module: str) -> float:
    return 0.5 if module in DECLARATIONS else WING_ORDER.index(_wing(module))


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for _, imported, names, _ in _imports(module):
            graph[module] |= {t for t in _targets(imported, names) if t != module and not
                              (MODULES[module].name == "__init__.py" and t.startswith(module + "."))}
    return graph


def test_every_wing_is_in_the_order():
    assert {_wing(m) for m in MODULES} <= set(WING_ORDER)


def test_imports_point_down_the_wings():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets
              if _wing(t) != _wing(m) and t not in DECLARATIONS and _level(t) > _level(m)]
    assert upward == []


def test_declarations_import_only_utils_and_each_other():
    graph = _graph()
    for module in DECLARATIONS:
        assert all(t in DECLARATIONS or _wing(t) == "utils" or t == "vtransfer.policies" for t in graph[module]), module


def test_there_are_no_import_cycles():
    graph, index, low, stack, on, cycles, counter = _graph(), {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_wing_takes_a_private_name_from_another():
    private = [f"{m} takes {n} from {imported}" for m in MODULES for _, imported, names, _ in _imports(m)
               for n in names if n.startswith("_") and not n.startswith("__") and imported.startswith("vtransfer")
               and _wing(_resolve(imported) or imported) != _wing(m)]
    assert private == []


def test_imports_inside_functions_are_only_the_listed_lazy_ones():
    def allowed(module: str, imported: str) -> bool:
        top = imported.split(".")[0]
        return (module in LAZY_IMPORTS or any(module.startswith(m + ".") for m in LAZY_IMPORTS if m != "vtransfer")
                or imported in LAZY_PACKAGES or top in LAZY_PACKAGES)

    hidden = [f"{m}:{node.lineno} imports {imported}" for m in MODULES for node, imported, _, inside in _imports(m)
              if inside and not allowed(m, imported)]
    assert hidden == []
