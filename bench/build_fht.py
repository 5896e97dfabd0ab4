"""Build the ``fast_hadamard_transform`` baseline (Dao-AILab) from a source tarball, sm_90a only.

The PyPI sdist of fast-hadamard-transform has no CUDA sources (it downloads prebuilt wheels from
GitHub, which a device machine cannot reach), so a GPU round carries the upstream source as
``.whl/fast-hadamard-transform-src.tar.gz`` (git-ignored, never committed; make it with
``git archive --prefix=fast-hadamard-transform/`` of github.com/Dao-AILab/fast-hadamard-transform)
and builds it here for the baseline only:

    python3 bench/build_fht.py .whl/fast-hadamard-transform-src.tar.gz /tmp/fht
    export PYTHONPATH=/tmp/fht/build:/tmp/fht/src/fast-hadamard-transform:$PYTHONPATH

The flags follow upstream's setup.py, with one target (sm_90a) to keep the build short.
"""
from __future__ import annotations

import os
import sys
import tarfile


def main(argv) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    tarball, dest = argv[1], argv[2]
    src = os.path.join(dest, "src")
    build = os.path.join(dest, "build")
    os.makedirs(src, exist_ok=True)
    os.makedirs(build, exist_ok=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(src)
    root = os.path.join(src, "fast-hadamard-transform")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    from torch.utils.cpp_extension import load
    load(name="fast_hadamard_transform_cuda",
         sources=[os.path.join(root, "csrc", "fast_hadamard_transform.cpp"),
                  os.path.join(root, "csrc", "fast_hadamard_transform_cuda.cu")],
         extra_cflags=["-O3"],
         extra_cuda_cflags=["-O3", "-U__CUDA_NO_HALF_OPERATORS__",
                            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                            "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                            "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
                            "--expt-extended-lambda", "--use_fast_math", "-lineinfo"],
         extra_include_paths=[root], build_directory=build, verbose=False)
    print(f"built fast_hadamard_transform_cuda in {build}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
