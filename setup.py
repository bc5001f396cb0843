"""Build rlhf_ext and its compiled part, rlhf_ext._C.

The C++ CPU kernels are always built; the CUDA kernels when torch has CUDA and
nvcc is found (no GPU is needed to build them). Knobs (environment variables):

  RLHF_EXT_CUDA=0|1        force the CUDA kernels off / on (on fails loudly if impossible)
  RLHF_EXT_NO_EXT=1        pure-Python install (torch and Triton backends only)
  RLHF_EXT_DEBUG=1         keep host debug info (release builds are stripped: -g0, -s)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0+PTX")
  MAX_JOBS                 parallel compile jobs (torch's ninja builder reads it)
  CUDA_HOME                the CUDA toolkit; found from nvcc on PATH otherwise

Install with `pip install --no-build-isolation .` after torch: build isolation
would compile against a different torch than the one you run. A build with the
compiled part requires exactly that torch version (its metadata pins it, and
rlhf_ext._C refuses to load under another torch with a message saying which).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def read_version():
    with open(os.path.join(ROOT, "rlhf_ext", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def env_flag(name):
    """None when unset, else whether the variable is truthy."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def toolkit_from_nvcc(nvcc):
    """The toolkit folder behind an nvcc on PATH.

    Some machines put a small wrapper script named nvcc on PATH
    (`exec /usr/local/cuda-X/bin/nvcc "$@"`); torch would take the wrapper's
    folder for CUDA_HOME and fail to link -lcudart, so follow the script.
    """
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            match = re.search(rb"(/\S+)/bin/nvcc\b", head)
            if match and os.path.isdir(match.group(1)):
                return match.group(1).decode()
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return toolkit_from_nvcc(nvcc)
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def pip_cuda_include_dirs():
    """Include folders of the nvidia-* wheels that torch's CUDA build pulls in.

    torch's CUDA headers include cuBLAS / cuSPARSE / cuSOLVER headers that a
    minimal system toolkit may lack; the wheels carry them.
    """
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None if it does not answer."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def want_cuda(torch):
    forced = env_flag("RLHF_EXT_CUDA")
    reasons = []
    if torch.version.cuda is None:
        reasons.append("this torch has no CUDA")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        reasons.append("nvcc was not found (set CUDA_HOME)")
    elif torch.version.cuda is not None and forced is not False:
        # torch refuses to build with an nvcc of another major version; say so here
        # and fall back to the CPU build instead of failing deep inside torch.
        found = nvcc_version(cuda_home)
        wanted = int(torch.version.cuda.split(".")[0])
        if found is None:
            reasons.append(f"{cuda_home}/bin/nvcc --version did not answer")
        elif found[0] != wanted:
            reasons.append(
                f"nvcc {found[0]}.{found[1]} in {cuda_home} does not match torch's CUDA "
                f"{torch.version.cuda} (set CUDA_HOME to a CUDA {wanted}.x toolkit)"
            )
    if forced is False:
        return None
    if reasons:
        if forced:
            sys.exit("rlhf_ext setup: RLHF_EXT_CUDA=1 but " + "; ".join(reasons))
        print("rlhf_ext setup: building without CUDA kernels: " + "; ".join(reasons))
        return None
    return cuda_home


# A pure-Python install runs on any torch with matmul out_dtype (2.8).
PURE_PYTHON_REQUIREMENTS = ["torch>=2.8", "numpy"]


def torch_requirement(torch_version):
    """The requirement of a wheel compiled against `torch_version`: that public version
    exactly (torch's C++ ABI is not stable across releases). The local label (+cu130)
    is dropped, as a requirement cannot carry one; the CPU/CUDA variant is checked at
    load time instead (rlhf_ext._C names the torch it was built against)."""
    return f"torch=={torch_version.split('+')[0]}"


def release_flags():
    """(compile, link) flags that keep host debug info out of a release build: the .so
    is ~4x smaller; RLHF_EXT_DEBUG=1 keeps it."""
    if env_flag("RLHF_EXT_DEBUG") or sys.platform == "darwin":
        return [], []
    return ["-g0"], ["-s"]


def extension_modules(version):
    """(ext_modules, cmdclass, install_requires) of this build."""
    if env_flag("RLHF_EXT_NO_EXT"):
        print("rlhf_ext setup: RLHF_EXT_NO_EXT=1, pure-Python install")
        return [], {}, PURE_PYTHON_REQUIREMENTS
    try:
        import torch
    except ImportError:
        sys.exit(
            "rlhf_ext setup: torch is not importable. Install torch first, then "
            "`pip install --no-build-isolation .` (or RLHF_EXT_NO_EXT=1 for a pure-Python install)."
        )

    cuda_home = want_cuda(torch)
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    defines = [
        ("RLHF_EXT_VERSION", f'"{version}"'),
        ("RLHF_EXT_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    # No -std flag: torch.utils.cpp_extension passes the standard its headers need.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    # -fno-trapping-math: lets GCC if-convert (vectorise) the selects of the CPU
    # softmax loops; nothing here reads floating-point exception flags.
    no_debug, strip = release_flags()
    cxx_flags = ["-O3", "-fno-trapping-math"] + openmp + no_debug
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(include_dirs=include_dirs, extra_link_args=openmp + strip)
    if cuda_home:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        defines += [
            ("RLHF_EXT_WITH_CUDA", None),
            ("RLHF_EXT_CUDA_VERSION", f'"{torch.version.cuda}"'),
            ("RLHF_EXT_CUDA_ARCHS", f'"{archs}"'),
        ]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # After the toolkit's own -I, so the wheels only fill in missing headers.
        extra_includes = [f"-I{d}" for d in pip_cuda_include_dirs()]
        nvcc_flags = [
            "-O3",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-Xptxas=-warn-spills",
        ] + extra_includes
        print(f"rlhf_ext setup: CUDA kernels for {archs} with {cuda_home}")
        ext = CUDAExtension(
            "rlhf_ext._C",
            sources,
            define_macros=defines,
            extra_compile_args={"cxx": cxx_flags + extra_includes, "nvcc": nvcc_flags},
            **kwargs,
        )
    else:
        ext = CppExtension(
            "rlhf_ext._C",
            sources,
            define_macros=defines,
            extra_compile_args={"cxx": cxx_flags},
            **kwargs,
        )
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass, [torch_requirement(torch.__version__), "numpy"]


version = read_version()
ext_modules, cmdclass, install_requires = extension_modules(version)

setup(
    version=version,
    # The benchmarks ship as rlhf_ext.bench (python -m rlhf_ext bench); their source folder
    # stays bench/ at the top of the checkout, where python -m bench runs them too.
    packages=find_packages(include=["rlhf_ext", "rlhf_ext.*"]) + ["rlhf_ext.bench"],
    package_dir={"rlhf_ext.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=install_requires,
)
