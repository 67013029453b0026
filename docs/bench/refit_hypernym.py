"""Fit module 1's models again with an existing fit's title tagger: what `autoknow fit --modules
taxonomy` gives with this code, without training the tagger again (minutes to hours on a CPU).

    python docs/bench/refit_hypernym.py OLD_MODELS FIT_CATALOGUE NEW_MODELS [CONFIG]

Everything else of module 1 (the hypernym classifier, the type vocabulary, the kNN reference and
its floors) is fitted by this code from FIT_CATALOGUE; the tagger folder is copied from
OLD_MODELS/taxonomy/tagger. CONFIG defaults to the config recorded in OLD_MODELS' manifest. For
experiments on the hypernym classifier and the rebuild's decisions only: a model folder made
this way is what a full fit would give where the tagger's training is unchanged.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(old: str, catalogue: str, new: str, config: str | None = None) -> None:
    from autoknow_ray.modules.taxonomy import fit as fit_module
    from autoknow_ray.rebuild import fit

    old_dir = Path(old)
    manifest = json.loads((old_dir / "manifest.json").read_text())
    tagger_stats = manifest["modules"]["taxonomy"].get("tagger", {})

    def reuse_tagger(train, cfg, out):
        shutil.copytree(old_dir / "taxonomy" / "tagger", out, dirs_exist_ok=True)
        return {k: v for k, v in tagger_stats.items() if k != "train_products"}

    fit_module.fit_tagger = reuse_tagger
    if config is None:
        import yaml

        config = str(Path(new).with_suffix(".config.yaml"))
        Path(config).write_text(yaml.safe_dump(manifest["config"]))
    result = fit(catalogue, new, config=config, modules=["taxonomy"])
    print(json.dumps(result.get("taxonomy", result), default=str)[:2000])


if __name__ == "__main__":
    main(*sys.argv[1:])
