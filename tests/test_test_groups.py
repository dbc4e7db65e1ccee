"""The suite's own scheduling: modules that declare an xdist_group run on one worker."""

from tests.conftest import declared_groups


def test_group_declarations_are_read_from_the_module_line(tmp_path):
    (tmp_path / "test_cluster.py").write_text('import pytest\npytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]\n')
    (tmp_path / "test_store.py").write_text("import pytest\npytestmark = pytest.mark.xdist_group('store')\n")
    # a group named inside a test is not a module-wide declaration
    (tmp_path / "test_loose.py").write_text('@pytest.mark.xdist_group("one")\ndef test_x():\n    pass\n')
    groups = declared_groups(tmp_path)
    assert {k.rsplit("/", 1)[-1]: v for k, v in groups.items()} == {"test_cluster.py": "ray", "test_store.py": "store"}


def test_the_shared_fixture_modules_are_grouped():
    groups = declared_groups()
    assert groups["tests/test_ray.py"] == "ray-cluster" and groups["tests/test_window_extract.py"] == "window-store"
