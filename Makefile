# Quick start:
#   make demo   install (CPU torch where there is no GPU) and run the end-to-end demo
#   make test   install with the dev extras and run the test suite
SHELL := /bin/bash
EXTRAS ?= preprocess,libribrain,dev

.PHONY: install demo test lint bench

install:
	@scripts/install.sh $(EXTRAS) > .install-python

demo: install
	"$$(tail -n1 .install-python)" -m ephys_gpt.cli demo --out runs/demo

test: install
	"$$(tail -n1 .install-python)" -m pytest -q $(PYTEST_ARGS)

lint: install
	"$$(tail -n1 .install-python)" -m ruff check ephys_gpt tests bench

bench: install
	for b in bench/*.py; do "$$(tail -n1 .install-python)" "$$b"; done
