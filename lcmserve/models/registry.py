"""What plug-in domains lend the generic layers: bundled names, their prompt guides, and data sources.

The generic layers (models, engine, distill, server) never import a domain. A domain package
declares an entry point in the group ``lcmserve.plugins`` (pyproject.toml); the first lookup
here loads every such plug-in, and each one registers its names:

    register_bundled("shapes-lcm", locate)            # load_model("shapes-lcm") finds its folder
    register_data_source("shapes", open_source)       # DistillConfig(data="shapes") finds its data
    register_prompt_guide("shapes-lcm", guide)        # the playground shows what the model draws
    register_caption_rewrite("shapes-shifted", fn)    # DistillConfig(caption_rewrite=...) distils a style

so ``load_model("shapes-lcm")`` works from any entry point (the CLI, the server, a notebook)
without the caller importing the domain first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "lcmserve.plugins"
KINDS = ("model", "lora")

_bundled: dict[str, dict[str, Callable[[str], Path]]] = {kind: {} for kind in KINDS}
_data_sources: dict[str, Callable[[int, int], Any]] = {}
_caption_rewrites: dict[str, Callable[[str], str]] = {}
_prompt_guides: dict[str, PromptGuide] = {}
_served_adapters: dict[str, dict[str, str]] = {}
_plugins_loaded = False


def register_bundled(name: str, locate: Callable[[str], Path], kind: str = "model") -> None:
    """Make ``name`` a bundled ``kind`` (model or lora); ``locate(param)`` returns its folder, or raises a
    ModelLoadError naming ``param`` when this installation lacks it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    _bundled[kind][name] = locate


def register_served_adapter(model: str, name: str, lora: str) -> None:
    """Serve the bundled LoRA ``lora`` as the per-request adapter ``name`` wherever the bundled model ``model`` is
    served (``lcmserve serve --no-bundled-adapters`` leaves it out)."""
    _served_adapters.setdefault(model, {})[name] = lora


def served_adapters(model: str) -> dict[str, str]:
    """Adapter name -> bundled LoRA name of the adapters served beside ``model`` (none for other models)."""
    load_plugins()
    return dict(_served_adapters.get(model, {}))


def register_data_source(name: str, open_source: Callable[[int, int], Any]) -> None:
    """Make ``name`` a value of ``DistillConfig.data``: ``open_source(seed, num_samples)`` returns the
    source (a finite set or an endless stream, see lcmserve.distill.data)."""
    _data_sources[name] = open_source


def register_caption_rewrite(name: str, rewrite: Callable[[str], str]) -> None:
    """Make ``name`` a value of ``DistillConfig.caption_rewrite``: an adapter distilled with it draws, for a
    caption c, what the base model draws for ``rewrite(c)``."""
    _caption_rewrites[name] = rewrite


@dataclass(frozen=True)
class PromptGuide:
    """What a bundled model understands, for the people who prompt it (the playground's model card)."""

    understands: str
    """The prompts it was trained on, in a sentence or two."""
    examples: tuple[str, ...] = ()
    """Prompts it draws right; the first is the playground's default."""


def register_prompt_guide(name: str, guide: PromptGuide) -> None:
    """Describe the prompts of the bundled model ``name``."""
    _prompt_guides[name] = guide


def prompt_guide(name: str) -> PromptGuide | None:
    """The guide of a bundled model's name; None for any other model (a folder, a Hub id, a preset)."""
    load_plugins()
    return _prompt_guides.get(name)


def load_plugins() -> None:
    """Load the plug-ins of ``PLUGIN_GROUP`` once; a broken one is logged and skipped."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    plugins = entry_points(group=PLUGIN_GROUP)
    if not plugins:
        logger.warning("no plug-ins in the entry point group %s: bundled model names and data sources are unknown "
                       "until the package is installed again (pip install -e .)", PLUGIN_GROUP)
    for plugin in plugins:
        try:
            plugin.load()()
        except Exception:  # a broken plug-in must not stop folders and Hub ids from loading
            logger.exception("plug-in %s (%s) failed to register", plugin.name, plugin.value)


def bundled_names(kind: str = "model") -> tuple[str, ...]:
    load_plugins()
    return tuple(_bundled[kind])


def resolve_bundled(spec: str, kind: str = "model", param: str = "model") -> str:
    """The folder of a bundled ``kind``'s name (e.g. ``shapes-lcm``); any other spec as it is.

    A folder of that name in the working directory wins over the bundled one."""
    load_plugins()
    locate = _bundled[kind].get(spec)
    if locate is None or Path(spec).exists():
        return spec
    return str(locate(param))


def data_source(name: str) -> Callable[[int, int], Any] | None:
    load_plugins()
    return _data_sources.get(name)


def data_source_names() -> tuple[str, ...]:
    load_plugins()
    return tuple(_data_sources)


def caption_rewrite(name: str) -> Callable[[str], str] | None:
    load_plugins()
    return _caption_rewrites.get(name)


def caption_rewrite_names() -> tuple[str, ...]:
    load_plugins()
    return tuple(_caption_rewrites)
