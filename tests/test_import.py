"""The import contract: importing heteromem never initialises CUDA and never compiles; without
the extension every op falls back to its reference and says so once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_import_neither_initialises_cuda_nor_compiles():
    result = run_python("""
        import sys, torch
        import heteromem
        assert not torch.cuda.is_initialized(), "import heteromem initialised CUDA"
        assert "torch.utils.cpp_extension" not in sys.modules, "import heteromem loaded the JIT compiler"
        info = heteromem.build_info()
        assert not torch.cuda.is_initialized(), "build_info() initialised CUDA"
        print(info.extension_loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True", "the compiled extension should load in the test venv"


def test_disabled_extension_falls_back_and_warns_once():
    result = run_python("""
        import warnings, torch
        import heteromem as hm
        from heteromem.ops import reference
        info = hm.build_info()
        assert not info.extension_loaded and "HETEROMEM_DISABLE_EXT" in info.extension_error
        assert info.cpu_simd == "none" and not info.cuda_kernels
        p, g, m, v = torch.randn(100), torch.randn(100), torch.zeros(100), torch.zeros(100)
        p2, m2, v2 = p.clone(), m.clone(), v.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in (1, 2):
                hm.ops.adam_step_(p, g, m, v, step=step, lr=0.01)
        messages = [str(w.message) for w in caught if issubclass(w.category, hm.HeteromemWarning)]
        assert len(messages) == 1, messages
        assert "HETEROMEM_DISABLE_EXT" in messages[0]
        for step in (1, 2):
            reference.adam_step_(p2, g, m2, v2, step=step, lr=0.01, beta1=0.9, beta2=0.999,
                                 eps=1e-8, weight_decay=0.0, adamw=True, grad_scale=1.0,
                                 param_lowp=None)
        assert torch.equal(p, p2) and torch.equal(m, m2) and torch.equal(v, v2)
        print("ok")
    """, HETEROMEM_DISABLE_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_build_info_reports_this_build():
    import torch

    import heteromem

    info = heteromem.build_info()
    assert info.version == heteromem.__version__
    assert info.torch_version == torch.__version__
    assert info.extension_loaded
    assert info.cpu_simd in ("avx512", "avx2", "scalar")
    assert info.num_threads == torch.get_num_threads()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f" in flags:
        assert info.cpu_simd_detected == "avx512"
    elif " avx2" in flags and " fma" in flags and " f16c" in flags:
        assert info.cpu_simd_detected == "avx2"
    if info.cuda_kernels:
        assert info.cuda_archs, "a CUDA build must say which archs it carries"
    text = str(info)
    assert "CPU SIMD path" in text and info.cpu_simd in text


@pytest.mark.parametrize("path", ["avx2", "scalar"])
def test_cpu_capability_can_be_forced_lower(path):
    import heteromem

    if path == "avx2" and heteromem.build_info().cpu_simd_detected == "scalar":
        pytest.skip("CPU has no AVX2")
    result = run_python("import heteromem; print(heteromem.build_info().cpu_simd)",
                        HETEROMEM_CPU_CAPABILITY=path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == path


def test_unknown_cpu_capability_is_a_clear_error():
    result = run_python("""
        import torch, heteromem as hm
        try:
            hm.ops.adam_step_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), step=1, lr=0.1)
        except ValueError as e:
            print(e)
    """, HETEROMEM_CPU_CAPABILITY="sse9")
    assert result.returncode == 0, result.stderr
    assert "HETEROMEM_CPU_CAPABILITY='sse9'" in result.stdout
    assert "avx512, avx2, scalar" in result.stdout
