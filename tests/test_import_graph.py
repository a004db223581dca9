"""The import graph of src/autofit: no cycle, and no import from a lower room up to a higher one.
Every import counts: function-level ones and ``if TYPE_CHECKING:`` ones too (a type a module
needs from a higher room says it is in the wrong room)."""

import ast
from pathlib import Path

import autofit

SRC = Path(autofit.__file__).parent
PACKAGE = "autofit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_checking: bool = True):
    """Every Import / ImportFrom node, at any depth (``if TYPE_CHECKING:`` bodies unless told not)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _edges(name: str, path: Path, modules: dict[str, Path], type_checking: bool = True) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]  # the package a relative import starts from
    out: set[str] = set()

    def add(target: str) -> None:
        # Importing a submodule runs its packages' __init__ first, except the packages the
        # importer is in itself: theirs ran before it.
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            inside = name.startswith(candidate + ".")
            if candidate in modules and candidate != name and (candidate == target or not inside):
                out.add(candidate)

    for node in _imports(ast.parse(path.read_text(), str(path)), type_checking):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
            continue
        if node.level:
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != PACKAGE:
            continue
        names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        if len(names) < len(node.names) or not names:
            add(base)  # a name defined in the module (or package) itself
        for target in names:
            add(target)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


# The rooms, lowest first (docs/architecture.md). A module may import its own room and those
# below it. The package's own __init__ (the public surface, imported lazily) is the face.
LAYERS = ["ground", "facts", "planning", "strategies", "engine", "face", "testing", "apps"]
ROOM_LAYER = {"facts": "facts", "planning": "planning", "strategies": "strategies", "engine": "engine",
              "testing": "testing", "cli": "apps", "batch": "apps"}
TOP_LEVEL = {"autofit": "face", "autofit.proxy": "face", "autofit.demo": "apps", "autofit.ray": "apps"}


def _layer(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    parts = module.split(".")
    return ROOM_LAYER.get(parts[1], "ground") if len(parts) > 2 or parts[1] in ROOM_LAYER else "ground"


def _graph(type_checking: bool = True) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules, type_checking) for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    """No module of autofit imports, directly or through others, a module that imports it; counted
    with the imports only type checkers read, and without them (what runs)."""
    for type_checking in (False, True):
        graph = _graph(type_checking)
        assert sum(len(v) for v in graph.values()) > 50  # the parser found the imports
        assert "autofit.facts.components" in graph["autofit.engine.wrappers"]
        cycle = _cycle(graph)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_room_imports_a_higher_one():
    """ground < facts < planning < strategies < engine < face < testing < apps: an import goes to
    the importer's room or a lower one, never up."""
    graph = _graph()
    assert _layer("autofit.planning.cost") == "planning" and _layer("autofit.plan") == "ground"
    assert "autofit.plan" in graph["autofit.planning.cost"]
    upward = sorted(f"{a} ({_layer(a)}) -> {b} ({_layer(b)})" for a, targets in graph.items() for b in targets
                    if LAYERS.index(_layer(b)) > LAYERS.index(_layer(a)))
    assert not upward, "imports up the rooms:\n" + "\n".join(upward)


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a planted cycle is reported as a path back to its start."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
