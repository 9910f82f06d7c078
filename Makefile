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
