"""Dependencies point one way: no script imports another, at module level or inside a function;
what they share lives in common.py (standard library only at import); `evaluate.py score` never
imports torch; each script can be forked with only the small modules it names."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("prepare_data", "train", "evaluate")
# what each script needs beside it, and nothing else of ours
NEEDS = {"prepare_data": ["common"], "train": ["common"], "evaluate": ["common", "cherrant"]}


def module_level_imports(name):
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
    out = set()
    for node in tree.body:  # module level only: imports inside functions are the point of the rule
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


def all_imports(name):
    """Every module imported anywhere in the file, functions included."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_imports_another_anywhere(name):
    ours = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert module_level_imports(name) & ours == set(NEEDS[name])
    assert all_imports(name) & ours == set(NEEDS[name])  # not even inside a function


def test_the_shared_modules_import_nothing_heavy():
    stdlib = {"contextlib", "glob", "json", "os", "re", "shutil", "stat", "sys", "tempfile"}
    assert module_level_imports("common") <= stdlib
    assert module_level_imports("cherrant") <= {"os", "re", "itertools", "numpy"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_can_be_forked_with_only_what_it_names(name, tmp_path):
    for f in [name] + NEEDS[name]:
        shutil.copy(os.path.join(ROOT, f"{f}.py"), tmp_path)
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_scoring_never_imports_torch(tmp_path):
    sample = os.path.join(ROOT, "lawbench_assets", "sample_predictions")
    code = ("import sys, evaluate; evaluate.main(['score', '--predictions', sys.argv[1], '--setting', 'zero_shot', "
            "'--out', sys.argv[2], '--tasks', '1-1,2-1,3-8']); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules); "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code, sample, str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(tmp_path / "out" / "scores.json")
