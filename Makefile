# The two commands of the README. Both set up whatever is missing first (idempotent, seconds when
# nothing is missing): PyTorch 2.13.0 in a cache venv and the generated .cargo/config.toml.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup demo test check fmt clippy doc bench-build clean-cache

## setup: install PyTorch 2.13.0 into the cache and point cargo at it
setup:
	@bash scripts/setup-libtorch.sh

## demo: the project's main job on the embedded default task
demo: setup
	$(CARGO) run --release --example smoke

## test: the whole test suite (unit, integration and doc tests of every crate)
test: setup
	$(CARGO) test --workspace

## check: formatting, lints, docs and benches (what .ci/run adds to `make test`)
check: setup fmt clippy doc bench-build

fmt:
	$(CARGO) fmt --all -- --check

clippy: setup
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc: setup
	RUSTDOCFLAGS="$${RUSTDOCFLAGS:-} -D warnings" $(CARGO) doc --workspace --no-deps

bench-build: setup
	$(CARGO) bench --workspace --no-run
