"""What this install can run, and the choice of backend for each call.

Backends: "cpu" and "cuda" (the compiled C++ / CUDA kernels in rlhf_ext._C),
"triton" (Triton kernels, on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1), "torch" (the pure-PyTorch reference, always there).
Importing rlhf_ext never fails because a part is missing: it warns once and
the other backends serve.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@functools.cache
def _compiled():
    """The compiled module rlhf_ext._C, or None (with one warning) when absent."""
    try:
        from rlhf_ext import _C  # noqa: F401  (registers the ops)

        return _C
    except ImportError as error:
        if os.environ.get("RLHF_EXT_QUIET") != "1":
            message = missing_extension_message(error, _extension_file_present())
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None


def _extension_files() -> list[str]:
    """The compiled rlhf_ext._C files in the package folder (a pure-Python install,
    RLHF_EXT_NO_EXT=1, has none)."""
    folder = os.path.dirname(os.path.abspath(__file__))
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [
        os.path.join(folder, name)
        for name in names
        if name.startswith("_C") and name.endswith(suffixes)
    ]


def _extension_file_present() -> bool:
    """Whether the package folder holds a compiled rlhf_ext._C at all."""
    return bool(_extension_files())


# csrc/registration.cpp kBuiltAgainstTorch: the marker and its terminator.
_BUILT_AGAINST_MARKER = b"rlhf_ext-built-against-torch="


def built_against_torch(path: str) -> str | None:
    """The torch version a compiled rlhf_ext._C file was built against, read from the
    marker in its bytes (it works when the module cannot load, e.g. undefined symbols
    under another torch); None when the file has no marker."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    start = data.find(_BUILT_AGAINST_MARKER)
    if start < 0:
        return None
    start += len(_BUILT_AGAINST_MARKER)
    end = data.find(b";", start, start + 128)
    return data[start:end].decode("ascii", "replace") if end > start else None


def _torch_mismatch_hint() -> str:
    """' (built against torch X, this is torch Y: ...)' when the compiled file names
    another torch than the running one, else ''."""
    running = torch.__version__.split("+")[0]
    for path in _extension_files():
        built = built_against_torch(path)
        if built and built.split("+")[0] != running:
            return (
                f"; it was compiled against torch {built} and this is torch {torch.__version__}"
                f": install torch=={built.split('+')[0]} or rebuild rlhf_ext against this torch"
            )
    return ""


def missing_extension_message(error: Exception, file_present: bool) -> str:
    """The one import-time note without rlhf_ext._C: a pure-Python install says so and
    which backends serve; a compiled part that is there but does not load says why
    (and, when it was built against another torch, which one)."""
    if not file_present:
        return (
            "rlhf_ext: a pure-Python install (no compiled kernels: built with RLHF_EXT_NO_EXT=1 "
            "or without a C++ compiler). Every op runs on the 'torch' backend, and on "
            "'triton' for CUDA tensors when Triton is installed. RLHF_EXT_QUIET=1 silences "
            "this note."
        )
    hint = "" if "compiled against torch" in str(error) else _torch_mismatch_hint()
    return (
        f"rlhf_ext: compiled kernels unavailable ({error}{hint}); using the Triton / torch "
        "backends. Reinstall with `pip install --no-build-isolation .` to build them "
        "(RLHF_EXT_QUIET=1 silences this warning)."
    )


def compiled_available() -> bool:
    """Whether the C++ (CPU) kernels are built and loaded."""
    return _compiled() is not None


def build_info() -> dict:
    """The compiled part's build information, or {} without one."""
    return dict(_build_info())


@functools.cache
def _build_info() -> dict:
    module = _compiled()
    return dict(module.build_info()) if module is not None else {}


def compiled_cuda_available() -> bool:
    """Whether the CUDA kernels were compiled into rlhf_ext._C."""
    return bool(_build_info().get("with_cuda", False))


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_import_error() -> str | None:
    """None when triton imports, else why not (triton is imported lazily)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken triton install must not break rlhf_ext
        return f"triton failed to import: {error}"
    return None


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on `device` (default: CUDA if present)."""
    return _triton_unavailable_reason(_device(device)) is None


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _triton_unavailable_reason(device: torch.device) -> str | None:
    reason = triton_import_error()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {device}"


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_unavailable_reason(device)
    if not compiled_available():
        return "the compiled extension rlhf_ext._C is not built or failed to load"
    if backend == "cpu":
        return None if device.type == "cpu" else f"it runs on CPU tensors, got {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors, got {device}"
        if not compiled_cuda_available():
            return "rlhf_ext._C was built without CUDA kernels (torch without CUDA or no nvcc)"
        return None
    raise AssertionError(backend)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (default: CUDA if present, else CPU)."""
    dev = _device(device)
    return [b for b in BACKENDS[1:] if _unavailable_reason(b, dev) is None]


# A constant per (op, backend, device): torch.compile evaluates it once instead of tracing
# into the availability probes (importlib / lru_cache, which Dynamo cannot trace everywhere).
@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend for one call of `op` on tensors on `device`.

    "auto": CUDA tensors -> cuda, else triton, else torch; CPU tensors -> cpu,
    else torch. An explicit choice that cannot run raises BackendUnavailableError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(b for b in order if _unavailable_reason(b, device) is None)
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend={backend!r} is unavailable: {reason}")
    return backend
