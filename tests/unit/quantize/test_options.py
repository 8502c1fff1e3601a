"""QuantizeOptions: one options object whose defaults are pipeline.yaml's (quantpipe.config), written once."""

from __future__ import annotations

import dataclasses

from quantpipe.config import QuantizeConfig
from quantpipe.quantize import QuantizeOptions


def test_defaults_are_the_config_defaults() -> None:
    assert QuantizeOptions() == QuantizeOptions.from_config(QuantizeConfig())


def test_every_config_key_reaches_the_options() -> None:
    # A key added to build.quantize without a field here would be parsed and then silently ignored.
    fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    assert set(QuantizeConfig.model_fields) <= fields


def test_splits_are_empty_until_resolved() -> None:
    assert QuantizeOptions().splits == {} and QuantizeOptions(split_activations="off").splits == {}
    assert QuantizeOptions(split_activations={"t": 2}).splits == {"t": 2}
