# Sourced by .ci/cuda and scripts/gpu-check.sh: the CUDA 13.0 toolchain from the Python package
# index's wheels (installed once, into $SAPO_CUDA_VENV, default ~/.cuda13) and the variables that
# candle's and this crate's build scripts read (../shared/docs/cuda.md has the recipe's notes).
# Needs `section` (from .ci/run, or a plain heading).
declare -F section >/dev/null || section() { echo "== $*"; }
sapo_cuda_venv=${SAPO_CUDA_VENV:-$HOME/.cuda13}
sapo_cuda_home() { echo "$sapo_cuda_venv"/lib/python3*/site-packages/nvidia/cu13; }
if ! [ -x "$(sapo_cuda_home)/bin/nvcc" ]; then
  section "installing the CUDA 13.0 wheels into $sapo_cuda_venv"
  python3 -m venv "$sapo_cuda_venv"
  "$sapo_cuda_venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 'nvidia-nvvm==13.0.*' \
    'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
    'nvidia-cuda-nvrtc==13.0.*' nvidia-cublas nvidia-curand
fi
CUDA_HOME=$(sapo_cuda_home)
# The GPU machines: driver 580 (CUDA 13.0), H100/H200 (sm_90).
export CUDA_HOME CUDA_PATH=$CUDA_HOME PATH=$CUDA_HOME/bin:$PATH LIBRARY_PATH=$CUDA_HOME/lib
export CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=90
