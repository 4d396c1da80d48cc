"""What the shapes domain lends the layers below it: its bundled model names and its data source.

Declared in pyproject.toml as the entry point ``shapes`` of the group ``lcmserve.plugins``;
``lcmserve.models.registry`` calls ``register`` on its first lookup.
"""

from __future__ import annotations

from functools import partial

from lcmserve.models.registry import register_bundled, register_data_source
from lcmserve.shapes import bundle
from lcmserve.shapes.data import open_distill_source


def register() -> None:
    for name in (bundle.LCM, bundle.TEACHER):
        register_bundled(name, partial(bundle.bundled, name))
    register_bundled(bundle.LORA, partial(bundle.bundled, bundle.LORA), kind="lora")
    register_data_source("shapes", open_distill_source)
