"""Code generation checks that need no GPU: every Triton kernel compiled to PTX (and
cubin) for sm_80 and sm_90, every CUDA source compiled by nvcc for the same archs.

The Triton interpreter (TRITON_INTERPRET=1, set by conftest) runs kernels on CPU but
cannot catch what only the GPU compiler sees (layouts, types, unsupported ops). Each
``kernels/<op>.py`` lists what to compile in a module-level ``PTX_CHECKS``: dicts with
``fn`` (the ``@triton.jit`` kernel), ``signature`` (non-constexpr argument types, e.g.
``{"x_ptr": "*fp32", "n": "i32"}``) and ``constexprs`` (values of the constexpr arguments).
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))

# Run in a fresh interpreter: under TRITON_INTERPRET=1, @triton.jit returns interpreter
# objects that triton.compile cannot take, and the flag is read when kernels are defined.
COMPILE_SCRIPT = """
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module = importlib.import_module("pymeta.kernels." + sys.argv[1])
checks = getattr(module, "PTX_CHECKS", None)
if not checks:
    sys.exit(f"pymeta.kernels.{sys.argv[1]} defines no PTX_CHECKS list (see tests/test_compile_kernels.py)")
for check in checks:
    for arch in map(int, sys.argv[2:]):
        source = ASTSource(check["fn"], check["signature"], check["constexprs"])
        ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        assert ".entry" in ptx, (check["fn"].__name__, arch)
    print(check["fn"].__name__, check["constexprs"], "ok")
"""


def _triton_cuda_reason() -> str | None:
    try:
        import triton.backends
    except ImportError as exc:
        return f"triton is not installed: {exc}"
    if "nvidia" not in triton.backends.backends:
        return "this triton build has no NVIDIA backend"
    return None


def run_all(commands: dict[str, list[str]], **kwargs) -> dict[str, subprocess.CompletedProcess]:
    """Run the compiler ``commands`` (name -> argv) concurrently, one per CPU core: each
    compile is one single-threaded process, and together they are most of this file's
    time in CI."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {name: pool.submit(subprocess.run, cmd, capture_output=True, text=True, timeout=900, **kwargs)
                   for name, cmd in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def ptx_results():
    """Every kernel module's PTX compile (name -> finished process)."""
    reason = _triton_cuda_reason()
    if reason is not None:
        pytest.skip(reason)
    # Fusion explicit: keeps Triton 3.9's "TRITON_DEFAULT_FP_FUSION is unset" warning out.
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    return run_all({m: [sys.executable, "-c", COMPILE_SCRIPT, m, *map(str, ARCHS)] for m in KERNEL_MODULES}, env=env)


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_triton_kernels_compile_to_ptx(module, ptx_results):
    result = ptx_results[module]
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-4000:]


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        found = str(Path(CUDA_HOME) / "bin" / "nvcc")
    return found


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Folder of the compiled CUDA objects, shared by the compile and link checks."""
    return tmp_path_factory.mktemp("cuda_objects")


@pytest.fixture(scope="module")
def nvcc_results(objects):
    """Every CUDA source compiled into ``objects`` (name -> (command, finished process))."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor in CUDA_HOME/bin): CUDA sources not compile-checked")
    archs = [arg for a in ARCHS for arg in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    # The flags of the JIT build (pymeta.ops._extension and torch's own nvcc flags).
    commands = {
        source.name: [nvcc, "-std=c++17", *archs, *COMMON_NVCC_FLAGS, "-O3", "--use_fast_math", "-Xcompiler",
                      "-fPIC", f"-I{source.parent}", *(f"-I{p}" for p in include_paths()), "-c", str(source),
                      "-o", str(objects / f"{source.stem}.o")]
        for source in CUDA_SOURCES
    }
    results = run_all(commands)
    return {name: (commands[name], results[name]) for name in commands}


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_sources_compile_with_nvcc(source, nvcc_results):
    cmd, result = nvcc_results[source.name]
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"


def test_cuda_objects_link_into_one_library(objects, nvcc_results):
    """The JIT build links every .cu into one library: no symbol may be defined twice
    (e.g. a non-template kernel defined in a header that two .cu files include)."""
    built = sorted(objects.glob("*.o"))
    if _nvcc() is None or len(built) != len(CUDA_SOURCES) or not built:
        pytest.skip("needs every CUDA source compiled by the test above")
    # Undefined symbols (torch, CUDA runtime) are fine in a shared library; duplicates are not.
    cmd = [_nvcc(), "-shared", *map(str, built), "-o", str(objects / "linked.so")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
