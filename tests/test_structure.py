"""The shape of the house (issue 22): imports go one way, from configurator, checkpoint and data_loader at the bottom,
through the model (with sizing and device choice) and weights, up to the scripts; nothing imports train.py; no file
imports itself round a circle; README's "Where things are" names every file at the top level."""
import ast
import os

from conftest import ROOT

# every top-level file's floor: a file imports only files of its own floor or below
FLOORS = {"configurator": 0, "checkpoint": 0, "data_loader": 0,
          "model": 1, "generate": 1, "sizing": 1, "devices": 1,
          "weights": 2,
          "train": 3, "sample": 3, "safe_train": 3, "export_hf": 3, "export_gguf": 3, "bench": 3, "prepare_fineweb": 3, "plot": 3}


def top_level_files():
    return sorted(f.removesuffix(".py") for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(name):
    """The top-level files that name.py imports, anywhere in it (imports inside functions included)."""
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and isinstance(node.args[0], ast.Constant):
            found.add(node.args[0].value.split(".")[0])
    return (found & set(top_level_files())) - {name}


def test_every_top_level_file_has_a_floor():
    missing = [f"{f}.py" for f in top_level_files() if f not in FLOORS]
    assert not missing, f"{missing}: give each a floor in FLOORS (tests/test_structure.py) and a row in README's table"
    assert not set(FLOORS) - set(top_level_files()), "FLOORS names a file that is gone"


def test_imports_go_one_way_and_nothing_imports_train():
    up = [f"{f}.py imports {m}.py" for f in top_level_files() for m in sorted(imports(f))
          if FLOORS.get(m, 99) > FLOORS.get(f, 99) or m == "train"]
    assert not up, up
    assert imports("model") == set(), "model.py imports nothing of ours (DESIGN.md)"


def test_no_import_circles():
    graph = {f: imports(f) for f in top_level_files()}
    done, path = set(), []

    def visit(f):
        if f in path:
            raise AssertionError("an import circle: " + " -> ".join(path[path.index(f):] + [f]))
        if f in done:
            return
        path.append(f)
        for m in sorted(graph[f]):
            visit(m)
        path.pop()
        done.add(f)

    for f in graph:
        visit(f)


def test_readme_says_where_each_file_is():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "\n## Where things are\n" in readme
    section = readme.split("\n## Where things are\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(f"{f}.py" for f in top_level_files())


def function_lengths(name):
    """[(function, first line, lines)] for every def in name.py, nested ones included: from the def (or its first
    decorator) to its last line."""
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    return [(n.name, n.lineno, n.end_lineno - min([n.lineno] + [d.lineno for d in n.decorator_list]) + 1)
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_train_py_is_phases_that_main_lists():
    """Issue 22's budget: train.py reads as the story of one run, main() a list of phases that fits on a screen
    (<= 60 lines), and no phase longer than 80."""
    lengths = function_lengths("train")
    main = [n for name, _, n in lengths if name == "main"]
    assert main and main[0] <= 60, f"train.py main() is {main} lines: at most 60"
    long = [f"{name} (line {line}): {n} lines" for name, line, n in lengths if n > 80]
    assert not long, f"train.py functions over 80 lines: {long}"
