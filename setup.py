"""Builds heteromem._C with torch.utils.cpp_extension.

CUDA kernels are built when the installed torch is a CUDA build and nvcc is found
(HETEROMEM_BUILD_CUDA=0|1 forces either way); otherwise only the CPU sources are built.
setup.py finds CUDA_HOME and the CUDA library headers that torch's CUDA wheels ship
(site-packages/nvidia/cu13/include), so nobody has to set CPATH. TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured; without TORCH_CUDA_ARCH_LIST the visible GPU's arch is used, else
DEFAULT_CUDA_ARCHS.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# Ampere (8.0 SASS also runs on 8.6/8.9 cards such as the 3090/4090/L40), Hopper, and PTX so
# that newer GPUs can JIT the kernels.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
GENERATED = ROOT / "build" / "generated"


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or nvcc's parent.

    nvcc on PATH may be a wrapper script (as on our CI machines), so its parent folder is
    only taken when it really is a toolkit.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if not _is_toolkit(os.environ[var]):
                sys.exit(f"setup.py: {var}={os.environ[var]} has no bin/nvcc and include/cuda_runtime.h; "
                         "point it at the CUDA toolkit folder or unset it")
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def wheel_cuda_include_dirs() -> list[str]:
    """Include folders of the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ... headers
    that torch's own headers include but a bare toolkit may lack)."""
    dirs: list[str] = []
    for site in sys.path:
        base = Path(site) / "nvidia"
        if not base.is_dir():
            continue
        for inc in sorted(base.glob("cu*/include")) + sorted(base.glob("*/include")):
            if inc.is_dir() and str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


def want_cuda(torch_cuda: str | None, cuda_home: str | None) -> bool:
    forced = os.environ.get("HETEROMEM_BUILD_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        sys.exit(f"setup.py: HETEROMEM_BUILD_CUDA={forced!r}; use 0 (CPU only) or 1 (require CUDA)")
    if forced == "0":
        return False
    if forced == "1":
        if torch_cuda is None:
            sys.exit("setup.py: HETEROMEM_BUILD_CUDA=1 but the installed torch is a CPU-only build; "
                     "install a CUDA build of torch")
        if cuda_home is None:
            sys.exit("setup.py: HETEROMEM_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; "
                     "set CUDA_HOME to the toolkit folder")
        return True
    return torch_cuda is not None and cuda_home is not None


def cuda_arch_list(torch) -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                        for i in range(torch.cuda.device_count())})
        return ";".join(archs)
    return DEFAULT_CUDA_ARCHS


def shared_libstdcxx_args() -> list[str]:
    """Link libstdc++ as the shared library torch itself uses, named before the driver's own
    -lstdc++. A toolchain or Python whose link line brings the static libstdc++.a (seen on a
    GPU image: no libstdc++ in `ldd _C.so`) would otherwise give _C.so its own copy of the
    iostream/locale statics, and the first std::ostringstream in it crashes (build_info did)."""
    if not sys.platform.startswith("linux"):
        return []
    return ["-Wl,--push-state,--no-as-needed", "-l:libstdc++.so.6", "-Wl,--pop-state"]


def write_build_config(with_cuda: bool, archs: str) -> None:
    """build/generated/heteromem_build_config.h: what build_info() reports about this build."""
    out = GENERATED / "heteromem_build_config.h"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "// Written by setup.py (or CMake) for this build; not tracked by git.\n#pragma once\n"
        f"#define HETEROMEM_WITH_CUDA {int(with_cuda)}\n"
        f'#define HETEROMEM_CUDA_ARCHS "{archs}"\n'
    )
    if not out.exists() or out.read_text() != text:  # keep the mtime: ninja rebuilds less
        out.write_text(text)


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda(torch.version.cuda, cuda_home)
    archs = cuda_arch_list(torch) if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    write_build_config(with_cuda, archs)

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "io").glob("*.cpp"))]
    # -ffp-contract=off: the Adam paths must not fuse multiply-adds, so every path (and the
    # PyTorch reference) rounds identically; see csrc/common/adam_math.h.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-maybe-uninitialized"]
    nvcc = ["-O3", "-lineinfo", "-Xcompiler", "-ffp-contract=off", "-Xcompiler", "-fopenmp",
            "--expt-relaxed-constexpr"]
    include_dirs = [str(ROOT / "csrc"), str(GENERATED)]
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*/**/*.cu"))]
        include_dirs += wheel_cuda_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="heteromem._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"] + shared_libstdcxx_args(),
        py_limited_api=False,
    )
    print(f"heteromem: building {'CUDA + CPU' if with_cuda else 'CPU-only'} extension"
          + (f" for archs {archs} (CUDA_HOME={cuda_home})" if with_cuda else ""), flush=True)
    class BuildExt(cpp_extension.BuildExtension):
        def finalize_options(self) -> None:
            super().finalize_options()
            # NOTE: one fixed object folder, so ninja rebuilds only what changed whether the
            # build was started by pip (editable or not) or by `setup.py build_ext --inplace`.
            self.build_temp = str(ROOT / "build" / "temp")

    return [ext], BuildExt


def main() -> None:
    ext_modules, build_ext = extensions()
    setup(
        packages=find_packages(include=["heteromem", "heteromem.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext},
    )


if __name__ == "__main__":
    main()
