#!/usr/bin/env bash
# Compiler wrapper for building mmcv 2.1.0 against torch >= 2.5.
# mmcv's setup.py hard-codes -std=c++17, but torch's ATen headers need C++20;
# the last -std flag wins, so rewrite that one flag and call the real compiler.
real="${PROMPTMATCH_REAL_CXX:-g++}"
args=()
for a in "$@"; do
  if [ "$a" = "-std=c++17" ]; then a="-std=c++20"; fi
  args+=("$a")
done
exec "$real" "${args[@]}"
