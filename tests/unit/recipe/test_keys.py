"""Every recipe key is documented in the schema itself, and a value outside a key's choices is refused at load with
the choices in the message."""

import dataclasses

import pytest

from finetune.base.errors import ConfigError
from finetune.recipe.keys import choices_of, help_of
from finetune.recipe.load import load_config
from finetune.recipe.schema import Config


def _keys():
    """(key, field) for every key of the schema: `name` and each group's fields."""
    for top in dataclasses.fields(Config):
        group = getattr(Config(), top.name)
        if dataclasses.is_dataclass(group):
            yield from ((f"{top.name}.{f.name}", f) for f in dataclasses.fields(group))
        else:
            yield top.name, top


KEYS = dict(_keys())


def test_every_key_has_help_and_every_group_a_description():
    undocumented = [key for key, f in KEYS.items() if not help_of(f).strip()]
    assert not undocumented, f"keys without help (give them option(..., help=...)): {undocumented}"
    for name, group in Config().groups().items():
        assert (type(group).__doc__ or "").strip(), name


@pytest.mark.parametrize("key", [key for key, f in KEYS.items() if choices_of(f)])
def test_a_value_outside_the_choices_is_refused_naming_them(key):
    choices = choices_of(KEYS[key])
    with pytest.raises(ConfigError) as info:
        load_config([f"{key}=not_a_choice"])
    assert f"{key}='not_a_choice' is not supported; choose one of {', '.join(choices)}." in str(info.value)
