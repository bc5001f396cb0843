"""Registration helpers for the ops' dispatcher kernels (docs/design.md §2.2).

A leaf module (it imports only torch and rlhf_ext._backend): each
``ops/<op>.py`` uses it to register, next to its public function, the fake
kernels and the backward of its compiled ops (``torch.ops.rlhf_ext.*``) and of
its Triton ops (``rlhf_ext/triton/<op>.py``). The Triton modules never import
back from ``ops/``.

One backward mechanism for every op: ``torch.library.register_autograd`` on the
dispatcher op, so a direct ``torch.ops.rlhf_ext.*`` call differentiates like
the public function, ``torch.library.opcheck``'s autograd test means something
and ``torch.compile`` traces without graph breaks.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable

import torch

from rlhf_ext._backend import compiled_available


def schema_of(op) -> torch._C.FunctionSchema:
    """The registered schema of a compiled op (``torch.ops.rlhf_ext.x``) or a Triton /
    custom op (the object ``triton_op`` / ``custom_op`` returned)."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.default._schema
    if isinstance(op, torch._ops.OpOverload):
        return op._schema
    return op._opoverload._schema  # torch.library.CustomOpDef


def input_count(op) -> int:
    """How many inputs the op's schema declares (what a backward returns gradients for)."""
    return len(schema_of(op).arguments)


def qualified_name(op) -> str:
    """ "rlhf_ext::x" for the op objects schema_of accepts."""
    schema = schema_of(op)
    return schema.name if not schema.overload_name else f"{schema.name}.{schema.overload_name}"


def register_fakes(fakes: dict[str, Callable]) -> None:
    """register_fake for compiled ops, keyed by their name in the rlhf_ext namespace;
    nothing without the compiled part (its ops do not exist then)."""
    if not compiled_available():
        return
    for name, fake in fakes.items():
        torch.library.register_fake(f"rlhf_ext::{name}")(fake)


def register_backward(op, backward: Callable, setup_context: Callable) -> None:
    """torch.library.register_autograd for a compiled or Triton op object."""
    torch.library.register_autograd(qualified_name(op), backward, setup_context=setup_context)


def first_order_only(op: str) -> Callable:
    """Decorator for a backward whose kernels have no derivative: called with
    create_graph=True (grad mode on inside the backward) it raises an error naming the
    public op `op`, instead of torch's warning and a second derivative that is silently
    zero (a gradient penalty would come out wrong). A plain backward, and AOTAutograd's
    tracing of it under torch.compile, run with grad mode off and are unaffected."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def guarded(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{op}: second-order gradients are not implemented (its backward "
                    "kernels have no derivative); differentiate without create_graph=True, "
                    'or use backend="torch" for higher-order gradients'
                )
            return backward(ctx, *grads)

        return guarded

    return decorate


def triton_loader(module: str, register: Callable) -> Callable:
    """A cached loader of ``rlhf_ext.triton.<module>`` that runs ``register(kernels)``
    once, on first use: triton is imported lazily (the package works without it), and
    the registrations of the Triton ops belong to the op's ops/ module. Thread-safe:
    two threads making the first call register once (a second registration raises)."""
    loaded: list = []
    lock = threading.Lock()

    def load():
        if not loaded:
            with lock:
                if not loaded:
                    kernels = importlib.import_module(f"rlhf_ext.triton.{module}")
                    register(kernels)
                    loaded.append(kernels)
        return loaded[0]

    return load
