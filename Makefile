# The two commands of the README. Both set up whatever is missing first (idempotent, seconds when
# nothing is missing): PyTorch 2.13.0 in a cache venv and the generated .cargo/config.toml.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup demo test peers peer-fixtures test-other-cpu test-compare test-transformers check fmt clippy doc bench-build bench-smoke clean-cache

## setup: install PyTorch 2.13.0 into the cache and point cargo at it
setup:
	@bash scripts/setup-libtorch.sh

## demo: the project's main job: `amend compare` on the embedded default task (7 to 9 minutes
## on 2 cores, plus 40 s to train the base model on the first run; an interrupted run
## resumes from its point cache); the report goes to reports/compare/ (report.md, results.json,
## plot.svg, plot.png)
demo: setup
	$(CARGO) run --release --bin amend -- compare --out reports/compare

## test-compare: the `amend compare --quick` end-to-end test (ignored by `make test`: minutes in
## the debug profile), in a release build
test-compare: setup
	$(CARGO) test --release --test compare_cli -- --include-ignored

## test-transformers: Hugging Face transformers (in the cache venv) loads the directories amend
## saves and the tiny model it trains (ignored by `make test`: needs the venv's python, minutes)
test-transformers: setup
	$(CARGO) test -p amend-models --test save --test recipe -- --ignored

## test: the whole test suite (unit, integration and doc tests of every crate)
test: setup
	$(CARGO) test --workspace

## test-other-cpu: the whole test suite again as another x86-64 CPU would run it: libtorch's
## baseline kernels (no AVX2/AVX-512), oneDNN limited to SSE4.1 and amend's kernels on their
## portable path. A fixture that encodes one CPU's rounding fails here on any machine. Then the
## kernels and the losses once more on amend's AVX2 path (an AVX-512 machine runs AVX-512 in
## `make test`; AMEND_KERNELS_SIMD=avx2 is a ceiling, so on an AVX2-only machine this is AVX2 again).
test-other-cpu: setup
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 AMEND_KERNELS_SIMD=portable $(CARGO) test --workspace
	AMEND_KERNELS_SIMD=avx2 $(CARGO) test -p amend-kernels -p amend-losses --lib --tests

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

## peers: install the pinned peers (TRL 1.16.0, liger-kernel 0.8.5 and TRL's runtime
## dependencies; torch and transformers untouched) into the setup's venv (seconds when present)
PEER_PY = $$(grep AMEND_TORCH_PYTHON .cargo/config.toml | cut -d'"' -f2)
peers: setup
	$(PEER_PY) -m pip install -q --no-deps trl==1.16.0 liger-kernel==0.8.5 accelerate==1.16.0 \
		datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pandas==3.1.1 psutil==7.2.2 pyarrow==26.0.1 \
		python-dateutil==4.0.0 tzdata==2026.6 xxhash==4.1.0

## peer-fixtures: regenerate crates/amend-losses/tests/fixtures/peers.json from the peers' own
## loss code
peer-fixtures: peers
	$(PEER_PY) scripts/gen_peer_fixtures.py

## bench-smoke: every benchmark once, to the end (criterion's --test mode; the custom-harness
## benches do one short round), about 3 minutes after the release build; the peers bench runs
## Liger-Kernel, so the pinned peers are installed first
bench-smoke: peers
	$(CARGO) bench --workspace -- --test

## examples: run every top-level example in the debug profile (as CI does)
# Examples of the facade (`cargo run --example NAME`) and of amend-kernels, which build without
# libtorch (`cargo run -p amend-kernels --example NAME`). Override to run a subset:
# `make examples EXAMPLES=tnt_step KERNEL_EXAMPLES=`.
EXAMPLES ?= smoke tnt_step custom_trainer preference_pair detox_projection fact_edit
KERNEL_EXAMPLES ?= fused_kernels
.PHONY: examples
examples: setup
	@set -e; for ex in $(EXAMPLES); do \
	  printf '\n==> example %s\n' "$$ex"; start=$$(date +%s); \
	  $(CARGO) run --quiet --example "$$ex"; \
	  printf '<== %s passed in %d s\n' "$$ex" "$$(( $$(date +%s) - start ))"; \
	done
	@set -e; for ex in $(KERNEL_EXAMPLES); do \
	  printf '\n==> example %s (amend-kernels, no libtorch)\n' "$$ex"; start=$$(date +%s); \
	  $(CARGO) run --quiet -p amend-kernels --example "$$ex"; \
	  printf '<== %s passed in %d s\n' "$$ex" "$$(( $$(date +%s) - start ))"; \
	done
