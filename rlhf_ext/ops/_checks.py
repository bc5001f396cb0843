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


TEMPERATURE_DTYPES = (torch.float32, torch.float64)


def check_logit_scale(op: str, logit_scale) -> float:
    """A finite float > 0 inside the float32 range (the logits' multiplier)."""
    logit_scale = check_finite_float(op, "logit_scale", logit_scale)
    if not 1.0 / FLOAT32_MAX <= logit_scale <= FLOAT32_MAX:
        raise ValueError(
            f"{op}: `logit_scale` must be a float in [{1.0 / FLOAT32_MAX:.3g}, "
            f"{FLOAT32_MAX:.3g}] (finite in float32, > 0), got {logit_scale!r}"
        )
    return logit_scale


def check_softcap(op: str, softcap, logit_scale: float) -> float | None:
    """None (no softcap) or a finite float > 0 whose ratio logit_scale / softcap (the
    tanh's input multiplier) is finite in float32."""
    if softcap is None:
        return None
    softcap = check_finite_float(op, "softcap", softcap)
    if not softcap > 0:
        raise ValueError(f"{op}: `softcap` must be None (no softcap) or > 0, got {softcap!r}")
    if not (softcap <= FLOAT32_MAX and logit_scale / softcap <= FLOAT32_MAX):
        raise ValueError(
            f"{op}: `softcap` {softcap!r} with `logit_scale` {logit_scale!r}: softcap and "
            "logit_scale / softcap must be finite in float32"
        )
    return softcap


def check_scaled_temperature(op: str, temperature, numerator: float) -> float:
    """check_temperature, and numerator / temperature (the kernels' multiplier of the
    logits: logit_scale without a softcap, 1 with one) finite in float32."""
    temperature = check_temperature(op, temperature)
    if numerator / temperature > FLOAT32_MAX:
        raise ValueError(
            f"{op}: `logit_scale` / `temperature` = {numerator!r} / {temperature!r} overflows "
            "float32 (the kernels multiply the logits by it)"
        )
    return temperature


def reference_transform(transform: tuple) -> dict:
    """check_logit_transform's tuple as the reference's keyword arguments."""
    temperature, temperatures, logit_scale, softcap = transform
    return {
        "temperature": temperature if temperatures is None else temperatures,
        "logit_scale": logit_scale,
        "softcap": softcap if softcap > 0 else None,
    }


def check_logit_transform(
    op: str, temperature, logit_scale, softcap, rows: torch.Tensor, rows_name: str,
    validate: bool,
) -> tuple[float, torch.Tensor | None, float, float]:  # fmt: skip
    """The logit transform's arguments of a log-prob op over `rows` ``[..., X]`` (the
    logits, or the hidden states), as its dispatcher ops take them: (temperature,
    temperatures, logit_scale, softcap), with a temperature tensor expanded to one entry
    per token (temperature then 1.0) and softcap 0.0 for None."""
    logit_scale = check_logit_scale(op, logit_scale)
    softcap = check_softcap(op, softcap, logit_scale)
    numerator = 1.0 if softcap is not None else logit_scale  # the logits' multiplier x T
    temperatures = None
    if isinstance(temperature, torch.Tensor):
        temperatures = check_temperature_tensor(
            op, temperature, rows, rows_name, numerator, validate
        )
        temperature = 1.0
    else:
        temperature = check_scaled_temperature(op, temperature, numerator)
    return temperature, temperatures, logit_scale, 0.0 if softcap is None else softcap


def check_temperature_tensor(
    op: str, temperature: torch.Tensor, rows: torch.Tensor, rows_name: str, numerator: float,
    validate: bool,
) -> torch.Tensor:  # fmt: skip
    """A per-token (``[...]``, the leading shape of `rows` ``[..., X]``), per-sequence (a
    prefix of it such as ``[B]``) or 0-d float32 / float64 tensor on the rows' device,
    without grad; returned expanded to the leading shape, contiguous. With ``validate``
    (eager only: a host sync), every entry must be what check_scaled_temperature accepts,
    else ValueError naming the first bad position."""
    lead = rows.shape[:-1]
    if temperature.dtype not in TEMPERATURE_DTYPES:
        raise TypeError(
            f"{op}: `temperature` as a tensor must be float32 or float64, got {temperature.dtype}"
        )
    check_same_device(op, "temperature", temperature, rows, rows_name)
    if temperature.requires_grad:
        raise ValueError(
            f"{op}: `temperature` must not require grad (no gradient flows to it); pass "
            "temperature.detach()"
        )
    if temperature.shape != lead[: temperature.dim()]:
        raise ValueError(
            f"{op}: `temperature` as a tensor must have the leading shape of `{rows_name}` "
            f"{tuple(lead)} (one per token), a prefix of it (e.g. {tuple(lead[:1])}: one per "
            f"sequence) or be 0-d, got {tuple(temperature.shape)}"
        )
    temps = temperature.reshape(temperature.shape + (1,) * (len(lead) - temperature.dim()))
    temps = temps.expand(lead).contiguous()
    if validate and eager():
        _raise_on_bad_temperature(op, temps, numerator)
    return temps


def _raise_on_bad_temperature(op: str, temps: torch.Tensor, numerator: float) -> None:
    t = temps.double()
    good = torch.isfinite(t) & (t >= 1.0 / FLOAT32_MAX) & (t <= FLOAT32_MAX)
    good &= numerator / t <= FLOAT32_MAX
    if not bool(good.all()):
        position = tuple(int(i) for i in (~good).nonzero()[0])
        raise ValueError(
            f"{op}: `temperature` at position {position} is {float(temps[position])!r}; "
            f"every temperature must be finite, in [{1.0 / FLOAT32_MAX:.3g}, "
            f"{FLOAT32_MAX:.3g}], with logit_scale / temperature finite in float32; pass "
            "validate=False to get NaN for such rows instead"
        )


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
