"""The README's method table is the registry's."""

from conftest import ROOT

from unipeft.registry import methods_table


def test_readme_method_table_matches_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# unipeft\n\n```\nmake demo")
    assert methods_table() in readme, "regenerate the table with unipeft.registry.methods_table()"
