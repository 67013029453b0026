"""Add fit's single-valued attribute list to an existing tagger artifact (the same statistic
fit now writes: distant supervision over the fit catalogue, TaggerConfig defaults)."""
import json, shutil, sys
from pathlib import Path
import polars as pl
from autoknow_ray.modules.taxonomy.config import TaggerConfig
from autoknow_ray.modules.taxonomy.distant import build_examples, single_valued_labels
src, dst, cat = map(Path, sys.argv[1:4])
if dst.exists(): shutil.rmtree(dst)
shutil.copytree(src, dst)
cfg = TaggerConfig(max_value_chars=200)
prods = pl.read_parquet(cat / "products.parquet")
ds = build_examples(prods, min_attribute_count=cfg.min_attribute_count,
                    empty_keep_fraction=cfg.empty_keep_fraction, max_value_chars=cfg.max_value_chars,
                    use_type=cfg.use_type, use_attributes=cfg.use_attributes, seed=cfg.seed)
f = dst / "taxonomy" / "tagger" / "config.json"
c = json.loads(f.read_text())
assert c["distant_supervision"]["n_spans"] == ds.stats["n_spans"], (c["distant_supervision"]["n_spans"], ds.stats["n_spans"])
c["single_valued"] = single_valued_labels(ds.stats, cfg.single_value_share)
print(dst, "single-valued", len(c["single_valued"]), "of", len(c["labels"]) - 1,
      "not:", sorted(set(c["labels"]) - set(c["single_valued"]) - {"type"}))
f.write_text(json.dumps(c, indent=2))
