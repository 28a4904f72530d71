#!/usr/bin/env bash
# Set up hf_mto on a fresh machine: Debian's Fashion-MNIST (the embedded default data) and the package with the
# versions tested here (constraints.txt). Usage: bash scripts/setup.sh [EXTRA]   e.g. `dev` for the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," >&2
    echo "or train on your own data with --dataset_name or --train_dir." >&2
  fi
fi

extra="${1:-tensorboard}"
python -m pip install --quiet -c constraints.txt -e ".[${extra}]"
