"""Argument checks shared by the public ops. Every message starts with the
op's public name and names the argument, what was expected and what came."""

from __future__ import annotations

import math

import torch

from rlhf_ext.ops._vocab import AGG_MODES, KL_KINDS, STRAIGHT_THROUGH_SUFFIX, is_kl_kind


def check_tensor(op: str, name: str, t, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(
            f"{op}: `{name}` must be float32, float64, bfloat16 or float16, got {t.dtype}"
        )
    return t


TARGET_DTYPES = (torch.int64, torch.int32)


def check_same_device(op: str, name: str, t: torch.Tensor, like: torch.Tensor,
                      like_name: str) -> None:  # fmt: skip
    if t.device != like.device:
        raise ValueError(
            f"{op}: `{name}` must be on {like.device} like `{like_name}`, got {t.device}"
        )


def check_target(op: str, target, rows: torch.Tensor, rows_name: str) -> None:
    """Class indices for the rows of `rows` ``[..., X]``: int64 or int32, on its device,
    of shape ``rows.shape[:-1]``."""
    check_tensor(op, "target", target, floating=False)
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"{op}: `target` must be int64 or int32, got {target.dtype}")
    check_same_device(op, "target", target, rows, rows_name)
    if target.shape != rows.shape[:-1]:
        raise ValueError(
            f"{op}: `target` must have shape {tuple(rows.shape[:-1])} (the shape of "
            f"`{rows_name}` without its last dimension), got {tuple(target.shape)}"
        )


def raise_on_bad_target(op: str, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError naming the first position whose target is outside [0, vocab) and not
    ignore_index (a host sync: the `validate=True` path only)."""
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{op}: `target` at position {position} is {int(target[position])}, outside "
            f"[0, {vocab}) and not ignore_index ({ignore_index}); pass validate=False to get "
            "NaN for such rows instead"
        )


# The largest finite float32: the kernels scale by 1 / temperature in float32.
FLOAT32_MAX = 3.4028234663852886e38
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_temperature(op: str, temperature) -> float:
    """A finite float > 0 (the logits' divisor) whose value and reciprocal are finite in
    float32, where the kernels use them (1e-39 would make 1 / T overflow to inf, and
    every log-prob NaN); returns it as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: `temperature` must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: `temperature` must be a finite float > 0, got {temperature!r}")
    if not (1.0 / FLOAT32_MAX <= temperature <= FLOAT32_MAX):
        raise ValueError(
            f"{op}: `temperature` must be in [{1.0 / FLOAT32_MAX:.3g}, {FLOAT32_MAX:.3g}] (it "
            f"and its reciprocal must be finite in float32), got {temperature!r}"
        )
    return float(temperature)


def check_finite_float(op: str, name: str, value) -> float:
    """A real, finite Python number (not bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: `{name}` must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: `{name}` must be finite, got {value!r}")
    return float(value)


def check_ignore_index(op: str, ignore_index) -> int:
    """An int that fits in int64 (the kernels compare targets with it as int64)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: `ignore_index` must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(
            f"{op}: `ignore_index` must fit in int64 [{INT64_MIN}, {INT64_MAX}], got {ignore_index}"
        )
    return ignore_index


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, what: str = "") -> None:
    if t.dim() != dim:
        raise ValueError(f"{op}: `{name}` must be {dim}-D{what}, got shape {tuple(t.shape)}")


def check_like(op: str, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """Same shape and device as `like`."""
    check_same_device(op, name, t, like, like_name)
    if t.shape != like.shape:
        raise ValueError(
            f"{op}: `{name}` must have the shape of `{like_name}` {tuple(like.shape)}, "
            f"got {tuple(t.shape)}"
        )


def check_mask(op: str, mask, like: torch.Tensor, like_name: str) -> torch.Tensor | None:
    """None, or a bool / 0-1 tensor of `like`'s shape and device."""
    if mask is None:
        return None
    check_tensor(op, "mask", mask, floating=False)
    check_like(op, "mask", mask, like, like_name)
    if mask.is_complex():
        raise TypeError(f"{op}: `mask` must be bool or 0/1 numbers, got {mask.dtype}")
    return mask


def check_rows(op: str, name: str, t, rows: int, like: torch.Tensor):
    """None, a Python number, or a floating tensor of shape [rows] on like's device."""
    if t is None or isinstance(t, (int, float)):
        return t
    check_tensor(op, name, t)
    if t.device != like.device:
        raise ValueError(f"{op}: `{name}` must be on {like.device}, got {t.device}")
    if t.dim() != 1 or t.shape[0] != rows:
        raise ValueError(
            f"{op}: `{name}` must be a float or have shape [{rows}], got {tuple(t.shape)}"
        )
    return t


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation / output dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def eager() -> bool:
    """False while torch.compile traces (data-dependent checks are skipped there)."""
    return not torch.compiler.is_compiling()


def check_kl_kind(op: str, name: str, kind) -> str:
    """A KL estimator name of ops/_vocab.py, optionally with the straight-through suffix."""
    if not is_kl_kind(kind):
        raise ValueError(
            f"{op}: `{name}` must be one of {KL_KINDS} (optionally with a "
            f"'{STRAIGHT_THROUGH_SUFFIX}' suffix), got {kind!r}"
        )
    return kind


def check_agg(op: str, agg) -> str:
    """A loss aggregation mode of ops/_vocab.py."""
    if agg not in AGG_MODES:
        raise ValueError(f"{op}: `agg` must be one of {AGG_MODES}, got {agg!r}")
    return agg
