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
