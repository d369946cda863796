"""Every recipe key is either part of a run's trajectory (a checkpoint of another value is not resumed)
or allowed to change on resume: a new key must be put on one side, or resume would ignore it silently."""

from vltune.core.checkpointing import MAY_CHANGE_ON_RESUME, TRAJECTORY_KEYS
from vltune.core.recipe_keys import recipe_keys


def test_every_recipe_key_is_on_exactly_one_side():
    keys = {key.name for key in recipe_keys()}
    trajectory, free = set(TRAJECTORY_KEYS), set(MAY_CHANGE_ON_RESUME)
    assert not trajectory & free, f"on both sides: {sorted(trajectory & free)}"
    assert keys - trajectory - free == set(), (
        f"recipe keys on neither side: {sorted(keys - trajectory - free)}; add each to TRAJECTORY_KEYS (changes what "
        "the weights become) or MAY_CHANGE_ON_RESUME (core/checkpointing.py)")
    assert (trajectory | free) - keys == set(), f"not recipe keys: {sorted((trajectory | free) - keys)}"
