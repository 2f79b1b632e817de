# The two commands of the quick start are `make demo` and `make test`.
# Both run scripts/bootstrap.sh first, which installs what is missing.

BIN := .venv/bin
# The Go toolchain may live outside PATH on a fresh machine.
export PATH := $(PATH):/usr/local/go/bin

.PHONY: setup demo test lint unit e2e bench bench-large image clean-sandboxes

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(BIN)/ambient-cni demo

test: setup lint unit e2e

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest -q tests/unit

e2e: setup
	$(BIN)/pytest -q tests/e2e

# All benchmarks at full size (about 20 minutes); rewrites the tables of BENCHMARKS.md.
bench: setup
	$(BIN)/python -m benchmarks --write BENCHMARKS.md

# The controller at 1,000, 2,000 and 5,000 nodes (20 pods each) side by side, one fresh sandbox
# per size (long: creating the 170,000 pods dominates); rewrites the machine line and the
# controller tables of BENCHMARKS.md. `make bench` keeps the one 1,000-node size.
bench-large: setup
	$(BIN)/python -m benchmarks --only scale --scale-sizes 1000,2000,5000 --write BENCHMARKS.md

# The image, from the Dockerfile as it is, with buildah (no Docker engine): localhost/ambient-cni:dev.
image: setup
	$(BIN)/ambient-cni sandbox image

# Removes every sandbox on this machine, including ones a crash left behind.
clean-sandboxes: setup
	$(BIN)/ambient-cni sandbox down --all
