# fedpool: the two commands a user needs are `make demo` and `make test` (README.md).
# Assets (the real model and datasets) go to $FEDPOOL_ASSETS, else ./assets.
ASSETS := $(abspath $(or $(FEDPOOL_ASSETS),assets))
export FEDPOOL_ASSETS := $(ASSETS)

.PHONY: assets test lint demo bench

assets:
	scripts/fetch-assets.sh "$(ASSETS)"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test: assets lint
	cargo test --workspace

# `make demo MODEL=smollm2`: the same federation of a decoder LLM (SmolLM2's 4-bit GGUF).
demo: assets
	cargo build --release -p fedpool-server -p fedpool-client
	MODEL=$(or $(MODEL),minilm) scripts/demo.sh

bench:
	cargo bench -p fedpool-common --bench codec

# Fuzzing (fuzz/: its own package, outside the workspace; `make test` does not run it). Builds the
# libFuzzer targets (stable rustc: cargo-fuzz's nightly flags through RUSTC_BOOTSTRAP=1), then runs
# each for FUZZ_SECONDS, one at a time, one process, niced: the working corpus grows in
# fuzz/corpus/<target> (ignored), the committed seeds are read from fuzz/seeds/<target>, a crash
# lands in fuzz/artifacts/<target>. Needs `cargo install cargo-fuzz`. README, "Security model".
FUZZ_SECONDS ?= 60
FUZZ_SANITIZER ?= address
FUZZ_TARGETS ?= frame codec_decode checkpoint server_config client_config
FUZZ_CARGO = cd fuzz && RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz
FUZZ_FLAGS = --sanitizer $(FUZZ_SANITIZER) --codegen-units 16

.PHONY: fuzz
fuzz:
	$(FUZZ_CARGO) build $(FUZZ_FLAGS)
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t && \
		( $(FUZZ_CARGO) run $(FUZZ_FLAGS) $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 ) || exit 1; \
	done
