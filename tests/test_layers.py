"""The shared layers take their own configuration section, not the root `Config` (which brings
every module's section, and so every module package, with it): importing the runtime or the
catalogue readers must not import a module."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("layer", ["autoknow_ray.runtime", "autoknow_ray.catalogue.reader",
                                   "autoknow_ray.catalogue.validate"])
def test_a_shared_layer_imports_no_module_and_not_the_root_config(layer):
    code = (f"import sys, {layer}\n"
            "bad = sorted(m for m in sys.modules if m.startswith('autoknow_ray.modules')"
            " or m == 'autoknow_ray.config')\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{layer} imports {out.stdout.strip()}"


def test_the_root_config_still_offers_the_shared_sections():
    from autoknow_ray import config, runtime_config
    from autoknow_ray.catalogue import config as catalogue_config

    assert config.RayConfig is runtime_config.RayConfig
    assert config.StageResources is runtime_config.StageResources
    assert config.IngestConfig is catalogue_config.IngestConfig
    cfg = config.Config()
    assert isinstance(cfg.ray, runtime_config.RayConfig)
    assert cfg.stage_resources("taxonomy") == runtime_config.StageResources()
