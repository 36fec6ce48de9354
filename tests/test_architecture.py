"""The shape of the code: a method is one folder, the registries are filled where methods are
defined, no import cycles, no project import hidden in a function without a reason."""

import ast
import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from shared.config import RunConfig
from shared.errors import PflError
from shared.methods import base, collective, collective_kinds, core_class, core_names
from shared.settings import sections, unregister_settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "cloud_server", "edge_client", "simulations")


def test_every_method_folder_registers_its_cores_and_collective_kinds():
    assert {"nonpersonalized", "lora-c", "lora-p", "oppu", "perpcs", "peft-retrieval",
            "perfit"} <= set(core_names())
    assert {"lora", "perfit"} <= set(collective_kinds())
    assert core_class("oppu").collective == ("lora",)
    assert core_class("perfit").collective == ("perfit",)
    assert core_class("perpcs").uses_pool and not core_class("oppu").uses_pool
    assert not core_class("peft-retrieval").federated
    with pytest.raises(Exception, match="unknown stage-1 method 'nope'"):
        collective("nope")


TOY = '''
"""A toy method: answers every query with the user's most frequent history output, or with
its setting ``toy.answer`` when set."""
from collections import Counter
from dataclasses import dataclass

from shared.methods.base import Core, PersonalState, register_core
from shared.settings import register_settings


@dataclass
class ToySettings:
    """The toy method's own settings section."""

    answer: str = ""  # "": the user's most frequent output


register_settings("toy", ToySettings)


class MostFrequent(Core):
    name = "toy-frequent"
    shared_model = False

    def personalize(self, runtime, user, augmentation, profile):
        field = runtime.task.output_field
        top = Counter(str(item[field]) for item in user.history).most_common(1)[0][0]
        top = runtime.section(ToySettings, "toy").answer or top
        return PersonalState(params=0, bytes=len(top.encode()), payload=top)

    def answer(self, runtime, state, prompts, generation, *, desc="", progress=False):
        return [state.payload for _ in prompts]

    def save_payload(self, payload, directory):
        (directory / "answer.txt").write_text(payload)

    def load_payload(self, directory, runtime):
        return (directory / "answer.txt").read_text()


register_core(MostFrequent.name, MostFrequent)
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """A method folder outside the repository, made importable as ``shared.methods.toy``."""
    import shared.methods

    folder = tmp_path / "methods" / "toy"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(shared.methods, "__path__", [*shared.methods.__path__,
                                                     str(folder.parent)])
    importlib.import_module("shared.methods.toy")
    yield "toy-frequent"
    base._CORES.pop("toy-frequent", None)
    unregister_settings("toy")
    sys.modules.pop("shared.methods.toy", None)


def test_adding_a_method_takes_one_folder(toy_method, tmp_path):
    """A new folder registers a core; pfl eval runs it by name, and the device's save/load
    round-trips its state, with no other file changed."""
    from simulations.evaluate import EvalConfig, run_eval

    out = run_eval(EvalConfig(task="synthetic", methods=["nonpersonalized", toy_method],
                              model="tiny", users=3, device="cpu", sharers=0, collective=0,
                              progress=False))
    toy = out["methods"][toy_method]
    assert toy["metrics"]["valid"] == 1.0  # the most frequent rating always parses
    assert toy["bytes_per_user"] == 1.0
    assert toy["metrics"]["mae"] != out["methods"]["nonpersonalized"]["metrics"]["mae"]

    core = core_class(toy_method)()
    state = base.PersonalState(params=0, bytes=1, payload="4")
    core.save(state, tmp_path / "state")
    again = core.load(tmp_path / "state", runtime=None)
    assert (again.payload, again.bytes) == ("4", 1)


def test_a_method_folder_brings_its_own_settings_section(toy_method):
    """The toy folder registers section ``toy``: `pfl eval --set toy.answer=5` reaches its
    personalization, the run config takes ``toy.answer``, and a misspelt field is refused
    with the closest name, in both."""
    from simulations.evaluate import EvalConfig, run_eval

    assert sections()["toy"].defaults() == {"answer": ""}

    def run(**options):
        return run_eval(EvalConfig(task="synthetic", methods=[toy_method], model="tiny",
                                   users=3, device="cpu", sharers=0, collective=0,
                                   progress=False, options=options))

    plain, fives = run(), run(toy={"answer": "5"})
    assert fives["methods"][toy_method]["metrics"] != plain["methods"][toy_method]["metrics"]
    assert {q["prediction"] for q in fives["methods"][toy_method]["queries"]} == {"5"}
    with pytest.raises(PflError, match="did you mean toy.answer"):
        run(toy={"answr": "5"})
    assert RunConfig.parse({"toy.answer": "5"}).settings == {"toy": {"answer": "5"}}
    with pytest.raises(PflError, match="did you mean toy.answer"):
        RunConfig.parse({"toy.answr": "5"})


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "wire" in parts:
                continue  # generated protobuf code
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _project_import(node, modules) -> list[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n in modules]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_cycle_between_modules():
    """Module-level imports form no cycle. Importing ``a.b.c`` first runs the ``__init__`` of
    ``a`` and ``a.b``, so those count as imported too, except a module's own packages (being
    imported already, they do not run again)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        own = set(_ancestors(name))
        for node in ast.parse(path.read_text()).body:
            for target in _project_import(node, modules):
                for dep in [target, *_ancestors(target)]:
                    if dep != name and dep not in own and dep in modules:
                        graph[name].add(dep)
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_every_module_imports_on_its_own():
    """Each module imports in a fresh interpreter as the first project module (what a
    cycle through a package's __init__ breaks)."""
    import subprocess

    names = sorted(n for n in _modules() if not n.startswith("tests"))
    code = ("import importlib, sys, traceback\n"
            "for name in sys.argv[1:]:\n"
            "    for mod in [m for m in sys.modules if m.split('.')[0] in "
            "('shared', 'cloud_server', 'edge_client', 'simulations')]:\n"
            "        del sys.modules[mod]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as exc:\n"
            "        print(f'{name}: {type(exc).__name__}: {exc}')\n")
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not result.stdout.strip(), result.stdout


def _explained(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on a line right above its run of import lines."""
    if "#" in lines[lineno - 1]:
        return True
    index = lineno - 2
    while index >= 0:
        text = lines[index].strip()
        if text.startswith("#"):
            return True
        if not text.startswith(("from ", "import ")):
            return False
        index -= 1
    return False


def test_project_imports_inside_functions_say_why():
    """An import of a project module inside a function has a comment on its line or right
    above its imports saying why (a heavy optional dependency, a command that runs alone)."""
    modules = _modules()
    silent = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if _project_import(inner, modules) and not _explained(lines, inner.lineno):
                    silent.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert not silent, f"{len(silent)} silent in-function project imports: {silent[:10]}"
