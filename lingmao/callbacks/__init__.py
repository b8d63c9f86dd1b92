"""Lightning callbacks of a training run, each built from its own file in `conf/callbacks/` (`_target_`).

Adding a callback is a module here (or anywhere importable) and a YAML file in `conf/callbacks/` listed in
`conf/callbacks/default.yaml`, or chosen on the command line: `callbacks=[default,my_callback]`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
from hydra.utils import instantiate

from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)


def instantiate_callbacks(configs: Mapping[str, Any] | None) -> list[L.Callback]:
    """Build every `{name: {_target_: ..., ...}}` entry; entries set to null are left out, and so is a
    factory's None (a callback that does not apply, e.g. progress output turned off)."""
    callbacks: list[L.Callback] = []
    for name, config in (configs or {}).items():
        if config is None:
            continue
        if not isinstance(config, Mapping) or "_target_" not in config:
            raise LingmaoError(f"callbacks.{name}: expected a mapping with a _target_ (the class to build)")
        callback = instantiate(config, _convert_="object")
        if callback is None:
            continue
        if not isinstance(callback, L.Callback):
            raise LingmaoError(f"callbacks.{name}: {config['_target_']} built a {type(callback).__name__}, "
                               "not a Lightning callback")
        log.debug("callback %s: %s", name, type(callback).__name__)
        callbacks.append(callback)
    return callbacks
