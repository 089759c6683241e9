# The two commands of the README. Both set up whatever is missing first (idempotent, seconds when
# nothing is missing): PyTorch 2.13.0 in a cache venv and the generated .cargo/config.toml.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup demo test test-compare check fmt clippy doc bench-build clean-cache

## setup: install PyTorch 2.13.0 into the cache and point cargo at it
setup:
	@bash scripts/setup-libtorch.sh

## demo: the project's main job: `amend compare` on the embedded default task (about 5 minutes
## on 2 cores, plus about a minute to train the base model on the first run); the report goes
## to reports/compare/ (report.md, results.json, plot.svg, plot.png)
demo: setup
	$(CARGO) run --release --bin amend -- compare --out reports/compare

## test-compare: the `amend compare --quick` end-to-end test (ignored by `make test`: minutes in
## the debug profile), in a release build
test-compare: setup
	$(CARGO) test --release --test compare_cli -- --include-ignored

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
