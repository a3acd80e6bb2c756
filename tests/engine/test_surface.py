"""The engine's declared surface holds: its modules import one another without a
cycle (at module level or inside functions), code outside the engine reaches none of
its underscore names, and the daemon offers exactly the operations it lists."""
from __future__ import annotations

import ast
from pathlib import Path

import blocksnap.engine as engine

SRC = Path(engine.__file__).resolve().parent.parent
ENGINE = SRC / "engine"


def _runtime_nodes(tree: ast.AST):
    """Every node that runs: all of them but `if TYPE_CHECKING:` blocks (type hints only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _engine_imports(path: Path) -> set[str]:
    """Engine modules that `path` imports when it runs (inside functions too)."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and path.parent == ENGINE:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("blocksnap.engine."):
            out.add(node.module.split(".")[2])
    return out


def test_no_import_cycle_among_engine_modules():
    graph = {p.stem: _engine_imports(p) for p in ENGINE.glob("*.py") if p.stem != "__init__"}
    assert {"volumes", "check", "transfer"} <= graph["pool"]   # (the graph is read, not assumed)
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == 2:
            return
        assert state.get(mod) != 1, "import cycle: " + " -> ".join(path + [mod])
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            visit(dep, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        visit(mod, [])


def _private_names_defined_in_engine() -> set[str]:
    names: set[str] = set()
    for p in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_nothing_outside_the_engine_touches_its_underscore_names():
    private = _private_names_defined_in_engine()
    assert {"_check", "_snap_runs", "_volumes", "_clone_into"} <= private   # the scan sees them
    found = []
    for p in SRC.rglob("*.py"):
        if ENGINE in p.parents:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{p.relative_to(SRC)}:{node.lineno}: .{node.attr}")
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and ".engine." in f".{node.module}.":
                mod = node.module
                if mod.split(".")[-1] != "engine":
                    found.append(f"{p.relative_to(SRC)}:{node.lineno}: imports {mod} (not the engine's surface)")
    assert not found, "\n".join(found)


def test_the_surface_is_what_engine_exports():
    for name in engine.__all__:
        assert getattr(engine, name) is not None
    assert {"Pool", "Snapshot", "Volume"} <= set(engine.__all__)


def test_volume_kinds_satisfy_the_protocol_and_declare_their_contract(tmp_path):
    from blocksnap.engine.volume_base import VolumeBase
    assert VolumeBase.__abstractmethods__ >= {"read", "write", "flush", "_snap_runs", "_clone_into", "_resize"}
    img = tmp_path / "origin.img"
    img.write_bytes(bytes(1 << 20))
    with engine.Pool.create(str(tmp_path / "pool"), size=64 << 20) as pool:
        row = pool.create_volume("r", size=1 << 20)
        cow = pool.create_volume("c", mode="cow", origin=str(img))
        for vol in (row, cow):
            assert isinstance(vol, engine.Volume)
        assert pool.has_volume("r") and not pool.has_volume("nope")


def test_the_daemon_offers_the_listed_operations_only():
    from blocksnap.service import ops
    # a public function added to ops.py is not callable over the socket unless listed
    defined = {n for n, v in vars(ops).items() if callable(v) and getattr(v, "__module__", "") == ops.__name__
               and not n.startswith("_")}
    assert set(ops.OPS) <= defined
    assert "stream_file" not in ops.OPS and "Pool" not in ops.OPS
