"""patch() and the peer versions each adapter is tested with (issue 24, item 4): inside the
range it patches; outside it (or for an unknown version) it replaces nothing and names both
versions, unless asked to patch anyway (allow_untested=True or the environment variable)."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from rlhf_ext.integrations import openrlhf, trl, verl
from rlhf_ext.integrations._patch import ALLOW_UNTESTED_ENV, Patcher, Target, VersionRange


def _replacement(x):
    return ("patched", x)


@pytest.fixture
def fake_peer(tmp_path, monkeypatch):
    """A package ``fakepeer`` (``fakepeer.core.f``) and a Patcher for it, tested with 1.2.x."""
    package = tmp_path / "fakepeer"
    package.mkdir()
    (package / "__init__.py").write_text('__version__ = "1.2.3"\n')
    (package / "core.py").write_text(textwrap.dedent("def f(x):\n    return x\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    patcher = Patcher(
        package="fakepeer",
        pip_name="fakepeer",
        targets=[Target("fakepeer.core", "f", _replacement)],
        supported=VersionRange("1.2", "1.3"),
    )
    yield patcher
    patcher.unpatch()
    for name in [m for m in sys.modules if m.split(".")[0] == "fakepeer"]:
        del sys.modules[name]


def test_a_supported_version_is_patched(fake_peer):
    import fakepeer.core

    assert fake_peer.patch("fakepeer_adapter.patch") == ["fakepeer.core.f"]
    assert fakepeer.core.f(1) == ("patched", 1)


@pytest.mark.parametrize("version", ["1.3.0", "1.1.9", "2.0", "0.9.0rc1"])
def test_an_untested_version_patches_nothing_and_says_why(fake_peer, version):
    import fakepeer
    import fakepeer.core

    fakepeer.__version__ = version
    message = (
        rf"^fakepeer_adapter\.patch: fakepeer {re.escape(version)} is installed; this adapter "
        r"is tested with fakepeer>=1\.2,<1\.3 and patches nothing"
    )
    with pytest.raises(RuntimeError, match=message):
        fake_peer.patch("fakepeer_adapter.patch")
    assert fakepeer.core.f(1) == 1 and not fake_peer.active


def test_an_unknown_version_is_untested(fake_peer):
    import fakepeer

    del fakepeer.__version__  # and no installed distribution of that name
    with pytest.raises(RuntimeError, match="fakepeer of unknown version is installed"):
        fake_peer.patch("fakepeer_adapter.patch")


def test_asked_to_patch_anyway_it_warns_and_patches(fake_peer, monkeypatch):
    import fakepeer
    import fakepeer.core

    fakepeer.__version__ = "1.4.0"
    with pytest.warns(RuntimeWarning, match=r"fakepeer 1\.4\.0 is installed, outside"):
        fake_peer.patch("fakepeer_adapter.patch", allow_untested=True)
    assert fakepeer.core.f(1) == ("patched", 1)
    fake_peer.unpatch()
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")  # the form a worker process can be given
    with pytest.warns(RuntimeWarning):
        fake_peer.patch("fakepeer_adapter.patch")
    assert fakepeer.core.f(2) == ("patched", 2)


def test_version_ranges_compare_release_numbers():
    tested = VersionRange("0.9.1", "0.10")
    assert "0.9.1" in tested and "0.9.9" in tested and "0.9.1.post1" in tested
    assert "0.9.0" not in tested and "0.10.0" not in tested and "0.10.0.dev0" not in tested
    assert None not in tested and "unknown" not in tested
    assert str(tested) == ">=0.9.1,<0.10"


def test_each_adapter_names_the_versions_it_is_tested_with():
    assert str(trl.SUPPORTED) == ">=1.10,<1.17"
    assert str(verl.SUPPORTED) == ">=0.9.1,<0.10"
    assert str(openrlhf.SUPPORTED) == ">=0.11.2,<0.12"
    assert "0.11.0" not in openrlhf.SUPPORTED  # its ppo_actor unpacks four loss values
