#!/usr/bin/env bash
# Lay out an ONNX Runtime distribution (the layout of ONNX Runtime's release archives: include/ and
# lib/) from what a machine without general internet access can get:
#   - the C/C++ headers from Debian's libonnxruntime-dev package, fetched with `apt-get download` from
#     the machine's configured apt sources. Debian ships it from 13 "trixie" on: when the configured
#     suites lack it, the same configured archives are asked for that suite through a temporary sources
#     list (the system's sources and state stay untouched);
#   - the shared library from the `onnxruntime` Python wheel (onnxruntime/capi/libonnxruntime.so.1.*).
# The m3rt C library loads ONNX Runtime at run time through OrtGetApiBase, so any library whose API
# version is at or above the headers' works (headers 1.21 with a 1.2x/1.3x wheel library, say).
#
# usage: assemble-onnxruntime.sh DEST [PYTHON]
#   DEST    the folder to create (DEST/include/onnxruntime_c_api.h, DEST/lib/libonnxruntime.so*)
#   PYTHON  a Python with the onnxruntime wheel installed (default: python3)
# Environment: M3RT_ORT_DEBIAN_SUITE: the suite asked when the configured ones lack the package
# (default trixie).
set -euo pipefail

dest=${1:?usage: assemble-onnxruntime.sh DEST [PYTHON]}
python=${2:-python3}
suite=${M3RT_ORT_DEBIAN_SUITE:-trixie}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs" "$work/root"
apt_opts=()
if apt-cache show libonnxruntime-dev >/dev/null 2>&1; then
  suite=$(apt-cache policy libonnxruntime-dev | awk '/\*\*\*/ {getline; print $3; exit}')
else
  # The archives the machine is configured with (their own suites' index lists name them), asked
  # for $suite instead.
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  mapfile -t uris < <(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null \
    | awk -v c="$codename" '$2 == c {print $1}' | sort -u)
  [ ${#uris[@]} -gt 0 ] || {
    echo "no configured apt source for '$codename' to ask for libonnxruntime-dev ($suite); run apt-get update" >&2
    exit 1
  }
  for uri in "${uris[@]}"; do echo "deb $uri $suite main"; done > "$work/sources.list"
  apt_opts=(
    -o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::archives=$work/archives"
    -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
  )
  apt-get "${apt_opts[@]}" -qq update
fi
# The headers: libonnxruntime-dev holds the CMake config and pulls the headers' package in.
pkgs=(libonnxruntime-dev)
while read -r dep; do pkgs+=("$dep"); done < <(
  apt-cache "${apt_opts[@]}" depends libonnxruntime-dev 2>/dev/null \
    | awk '/Depends:/ {print $2}' | grep -i onnxruntime | grep -v '^<' | grep -vE '^libonnxruntime[0-9.]+$' || true)
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${pkgs[@]}")
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

header=$(find "$work/root" -name onnxruntime_c_api.h | head -n 1)
[ -n "$header" ] || { echo "no onnxruntime_c_api.h in ${pkgs[*]}" >&2; exit 1; }
ort_dir=$("$python" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')
lib=$(find "$ort_dir/capi" -maxdepth 1 -name 'libonnxruntime.so.1*' | sort | tail -n 1)
[ -n "$lib" ] || { echo "no libonnxruntime.so.1* in $ort_dir/capi (install the onnxruntime wheel)" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest/include" "$dest/lib"
cp "$(dirname "$header")"/*.h "$dest/include/"
cp "$lib" "$dest/lib/"
name=$(basename "$lib")
ln -sf "$name" "$dest/lib/libonnxruntime.so.1"
ln -sf "$name" "$dest/lib/libonnxruntime.so"
headers_version=$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$dest/include/onnxruntime_c_api.h")
lib_version=$("$python" -c 'import onnxruntime; print(onnxruntime.__version__)')
printf 'headers: Debian %s %s (ORT_API_VERSION %s)\nlibrary: onnxruntime wheel %s (%s)\n' \
  "$suite" "$(basename "$(find "$work/debs" -name 'libonnxruntime-dev*.deb' | head -n 1)")" "$headers_version" \
  "$lib_version" "$name" > "$dest/SOURCES.txt"
cat "$dest/SOURCES.txt"
