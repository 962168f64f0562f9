#!/usr/bin/env bash
# Installs what tandem needs to build and test, with apt, on Debian 12 or Ubuntu 24.04.
# Only missing packages are installed; a machine that has them all is left untouched.
# CUDA (nvcc, cuBLASLt, NCCL) is optional and not installed here: without it tandem builds for
# the CPU only.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git curl
  libgtest-dev libgmock-dev
  nlohmann-json3-dev libtomlplusplus-dev libcpp-httplib-dev
  libopenblas-dev zlib1g-dev
  libopenmpi-dev openmpi-bin
  libhdf5-dev liburing-dev libisal-dev libfabric-dev libnuma-dev
  python3-h5py
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
