"""A test that needs an asset which is not installed is skipped with the reason, never errors (conftest hook)."""

from __future__ import annotations

import pytest

from conftest import _asset_missing

pytest_plugins = ["pytester"]


def test_an_asset_error_from_the_assets_package_is_recognised(monkeypatch, tmp_path):
    from tokenreduce.assets import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "_candidate_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError) as excinfo:
        fashion_mnist.load_fashion_mnist("test")
    assert _asset_missing(excinfo)
    with pytest.raises(FileNotFoundError) as other:
        open(tmp_path / "not-an-asset")
    assert not _asset_missing(other)  # a test's own missing file still fails


def test_such_a_test_is_reported_as_skipped(pytester):
    pytester.makeconftest((__import__("pathlib").Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        """
        from tokenreduce.assets import fashion_mnist

        def test_needs_fashion_mnist(monkeypatch, tmp_path):
            monkeypatch.setattr(fashion_mnist, "_candidate_dirs", lambda: [tmp_path])
            fashion_mnist.load_fashion_mnist("test")
        """)
    result = pytester.runpytest_inprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*asset not installed*Fashion-MNIST*"])
