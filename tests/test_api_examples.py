"""The API reference's examples (the stable names' docstrings) run and give what they show."""

import doctest

import pytest

import twist_fl.core.blocks
import twist_fl.core.blueprint
import twist_fl.core.config
import twist_fl.core.model


@pytest.mark.parametrize("module", [twist_fl.core.blocks, twist_fl.core.blueprint, twist_fl.core.config,
                                    twist_fl.core.model], ids=lambda m: m.__name__)
def test_the_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_every_stable_name_has_an_example_and_its_arguments():
    import twist_fl

    for name in ("GPT", "GPTConfig", "Blueprint", "sample_blueprints", "slice_state", "coverage_average"):
        doc = getattr(twist_fl, name).__doc__
        assert "Example:" in doc and (">>>" in doc), name
        assert "Args:" in doc or "Attributes:" in doc, name
