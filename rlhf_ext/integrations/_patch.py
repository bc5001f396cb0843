"""Shared patch / unpatch machinery for the peer adapters.

A peer function lives in its defining module, but other modules of the peer hold their own
references to it (``from trl.trainer.utils import selective_log_softmax`` binds the name in
the importing module; verl's ``register_policy_loss`` keeps it in a dict). Replacing only the
defining attribute would leave those callers on the original, so a patch walks every loaded
module of the peer package and replaces each module attribute and each module-level dict
value that *is* the original object. Modules the peer imports later read the already patched
defining attribute, so they get the replacement too.

Every replaced slot is recorded with its original; ``unpatch`` puts each one back, in reverse
order, so the peer is exactly as it was.

Each peer's adapter is tested against a range of the peer's versions (``supported``).
Outside it ``patch`` replaces nothing and says so: a peer release can change what its call
sites expect (OpenRLHF 0.11.0's ``ppo_actor`` unpacks four values where 0.11.2's loss
returns five), and a patch that crashes mid-run is worse than none.
``patch(allow_untested=True)``, or ``RLHF_EXT_ALLOW_UNTESTED_PEERS=1`` in the environment
(for the processes a peer starts itself), patches anyway, with a warning.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

ALLOW_UNTESTED_ENV = "RLHF_EXT_ALLOW_UNTESTED_PEERS"


@dataclass(frozen=True)
class VersionRange:
    """The peer versions an adapter is tested with: ``minimum <= version < below``,
    compared by their leading release numbers (``1.16.0.dev0`` counts as 1.16.0)."""

    minimum: str
    below: str

    def __contains__(self, version: str | None) -> bool:
        if version is None:
            return False
        release = _release(version)
        return release is not None and _release(self.minimum) <= release < _release(self.below)

    def __str__(self) -> str:
        return f">={self.minimum},<{self.below}"


def _release(version: str) -> tuple[int, ...] | None:
    """The release numbers of ``version``, padded to three (None when it has none)."""
    found = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if found is None:
        return None
    numbers = tuple(int(part) for part in found.group(1).split("."))
    return numbers + (0,) * (3 - len(numbers))


@dataclass(frozen=True)
class Target:
    """One peer object to replace: ``module`` is the defining module, ``name`` the attribute
    (``"Class.method"`` for a method), ``replacement`` what goes in its place."""

    module: str
    name: str
    replacement: object
    # skipped when `module`, or `name` in it, does not exist in the installed version
    optional: bool = False


@dataclass
class _Slot:
    """One place that held the original: ``holder[key]`` (a dict) or ``getattr(holder, key)``."""

    holder: object
    key: str
    original: object
    replacement: object
    qualname: str
    is_item: bool = False

    def write(self, value) -> None:
        if self.is_item:
            self.holder[self.key] = value
        else:
            setattr(self.holder, self.key, value)


@dataclass
class Patcher:
    """Patch state of one peer: its package (``trl``), its pip name, the targets."""

    package: str
    pip_name: str
    targets: list[Target]
    supported: VersionRange
    _slots: list[_Slot] = field(default_factory=list)
    _originals: dict[str, object] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the peer is patched now."""
        return bool(self._slots)

    def original(self, qualname: str):
        """The peer's own object named ``qualname`` (``"trl.trainer.utils.entropy_from_logits"``),
        whether or not the peer is patched now (imports the peer if needed)."""
        if qualname in self._originals:
            return self._originals[qualname]
        for target in self.targets:
            if qualname == f"{target.module}.{target.name}":
                return _resolve(importlib.import_module(target.module), target.name)
        known = ", ".join(f"{t.module}.{t.name}" for t in self.targets)
        raise ValueError(
            f"rlhf_ext.integrations.{self.package}.original: `qualname` must name one of the "
            f"replaced targets ({known}), got {qualname!r}"
        )

    def installed_version(self) -> str | None:
        """The imported peer's ``__version__``, else its distribution's; None if neither."""
        version = getattr(sys.modules.get(self.package), "__version__", None)
        if isinstance(version, str):
            return version
        try:
            return importlib.metadata.version(self.pip_name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def patch(self, caller: str, allow_untested: bool = False) -> list[str]:
        """Replace every target and every reference to it in the loaded peer modules.

        Returns the qualified names of all slots replaced. Idempotent: a second call while
        patched changes nothing and returns the same list. A peer version outside
        ``supported`` is a RuntimeError naming both, unless ``allow_untested`` (or the
        environment's ``RLHF_EXT_ALLOW_UNTESTED_PEERS=1``): then a warning, and the patch.
        """
        if self.active:
            return [slot.qualname for slot in self._slots]
        # Import every defining module before replacing anything, so that no module of the
        # peer binds a replacement by name while it loads.
        present = self._import_peer(caller)
        self._check_version(caller, allow_untested)
        try:
            for target in present:
                self._patch_target(target)
        except BaseException:
            self.unpatch()
            raise
        return [slot.qualname for slot in self._slots]

    def unpatch(self) -> list[str]:
        """Restore every replaced slot; returns the qualified names restored (empty when
        the peer was not patched)."""
        restored = [slot.qualname for slot in self._slots]
        for slot in reversed(self._slots):
            slot.write(slot.original)
        restored += self._restore_late_bindings()
        self._slots.clear()
        self._originals.clear()
        return restored

    def _restore_late_bindings(self) -> list[str]:
        """Peer modules first imported while patched bound the replacement by name; give
        them the original too, so unpatch leaves no replacement anywhere in the peer."""
        originals = {id(slot.replacement): slot.original for slot in self._slots}
        restored = []
        for name, loaded in sorted(sys.modules.items()):
            if loaded is None or not _inside(name, self.package):
                continue
            for attr, value in list(vars(loaded).items()):
                if callable(value) and id(value) in originals:
                    setattr(loaded, attr, originals[id(value)])
                    restored.append(f"{name}.{attr}")
        return restored

    def _check_version(self, caller: str, allow_untested: bool) -> None:
        version = self.installed_version()
        if version in self.supported:
            return
        found = f"{self.pip_name} {version}" if version else f"{self.pip_name} of unknown version"
        tested = f"{self.pip_name}{self.supported}"
        if allow_untested or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
            warnings.warn(
                f"{caller}: {found} is installed, outside the versions this adapter is tested "
                f"with ({tested}); patching anyway, as asked: check the results against the "
                "unpatched peer",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        raise RuntimeError(
            f"{caller}: {found} is installed; this adapter is tested with {tested} and patches "
            "nothing outside it (a peer release can change what its call sites expect, and a "
            f"patch that crashes mid-run is worse than none). Install {tested}, or pass "
            f"allow_untested=True (or set {ALLOW_UNTESTED_ENV}=1) to patch anyway"
        )

    def _import_peer(self, caller: str) -> list[Target]:
        """Import the peer and the modules that define the targets; the targets present."""
        try:
            importlib.import_module(self.package)
            present = [t for t in self.targets if not t.optional or _target_exists(t)]
            for target in present:
                importlib.import_module(target.module)
            return present
        except ImportError as error:
            raise ImportError(
                f"{caller}: the `{self.pip_name}` package is not installed or fails to import "
                f"({error}); install it (pip install {self.pip_name}) to patch it"
            ) from error

    def _patch_target(self, target: Target) -> None:
        module = importlib.import_module(target.module)
        owner_path, _, attr = target.name.rpartition(".")
        owner = _resolve(module, owner_path) if owner_path else module
        original = getattr(owner, attr)
        qualname = f"{target.module}.{target.name}"
        self._originals[qualname] = original
        self._replace(owner, attr, original, target.replacement, qualname, is_item=False)
        if owner_path:  # a method: references elsewhere go through the class
            return
        for name, loaded in sorted(sys.modules.items()):
            if loaded is None or not _inside(name, self.package):
                continue
            self._replace_references(loaded, name, original, target.replacement)

    def _replace_references(self, module, module_name: str, original, replacement) -> None:
        for attr, value in list(vars(module).items()):
            if value is original:
                self._replace(module, attr, original, replacement, f"{module_name}.{attr}")
            elif type(value) is dict:
                for key, item in list(value.items()):
                    if item is original:
                        where = f"{module_name}.{attr}[{key!r}]"
                        self._replace(value, key, original, replacement, where, is_item=True)

    def _replace(self, holder, key, original, replacement, qualname, *, is_item=False) -> None:
        slot = _Slot(holder, key, original, replacement, qualname, is_item)
        slot.write(replacement)
        self._slots.append(slot)


def _module_exists(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:  # missing, or its own imports fail: an optional target is skipped
        return False
    return True


def _target_exists(target: Target) -> bool:
    """Whether the installed peer has the target's module and the attribute in it."""
    if not _module_exists(target.module):
        return False
    try:
        _resolve(importlib.import_module(target.module), target.name)
    except AttributeError:
        return False
    return True


def _inside(module_name: str, package: str) -> bool:
    return module_name == package or module_name.startswith(package + ".")


def _resolve(root, dotted: str):
    value = root
    for part in dotted.split(".") if dotted else ():
        value = getattr(value, part)
    return value
