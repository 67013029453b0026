"""A synthetic product catalogue with gold labels: `autoknow synth --products N --out DIR --seed S`.

The catalogue is shaped like a real one so that every module of the pipeline has something to
find, and `gold/` says what the right answer was:

- a 3-level taxonomy (departments > categories > product types) with a few hundred leaf types for
  large N, some with two parents (a DAG); type names are compound nouns whose head noun is shared
  within a category ("green tea", "herbal tea" < "tea"); ~5% of leaf types are withheld from
  `taxonomy.parquet` (their products keep the type name in the title, `product_type` null) and
  their parents are in `gold/hypernyms.parquet`;
- per-type attribute vocabularies (applicability differs per type, values are Zipf-distributed),
  brands made of syllables, product types Zipf-distributed over products;
- titles, descriptions and bullets built from templates, with the exact character offsets of
  every value placed in a title or description in `gold/spans` (a slice equals the value up to
  letter case: titles are re-cased as a whole); values only in the structured `attributes` get
  a row with field null and start = end = -1, so `gold/spans` is the full list of true values;
- noise: ~10% missing and ~3% wrong `product_type`, ~5% of products with one wrong attribute
  value (`gold/wrong_values`), ~5% of structured values written as a synonym variant and some
  product types written as a variant (`gold/synonyms`), values missing from the structured
  attributes but present in the description (to impute);
- reviews and Q&A for ~30% of products, search behaviour (queries shared by products of the same
  and of sibling types), directed co-purchases (src type -> complementary dst type, plus
  same-type pairs) with ~10% of the pairs held out in `gold/copurchase`.

Generation is shard-wise and memory stays flat in N: the "world" (taxonomy, vocabularies,
sampling tables) depends on N only through the number of types, products are generated in fixed
blocks of GEN_BLOCK rows from a per-block random stream (so a block's content does not depend on
N nor on `shard_rows`), and a product's type and popularity are counter-based hashes of its index
(so co-purchase partners anywhere in the catalogue can be drawn without holding it).
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from autoknow_ray.progress import bar as progress_bar
from autoknow_ray.schema import (
    ATTRIBUTE_PAIR,
    BEHAVIOR,
    COPURCHASE,
    GOLD_COPURCHASE,
    GOLD_HYPERNYMS,
    GOLD_SPANS,
    GOLD_SYNONYMS,
    GOLD_TYPES,
    GOLD_WRONG_VALUES,
    PRODUCTS,
    TAXONOMY,
    TEXTS,
    conform,
)

GENERATOR = "autoknow_ray.catalogue.synth"
VERSION = 1
GEN_BLOCK = 2048  # products per random stream; fixed so that content does not depend on shard_rows
ROW_GROUP = 65_536
COPURCHASE_POOL = 16_384  # random catalogue indices per block to draw co-purchase partners from

# ---- rates -----------------------------------------------------------------------------------
P_TYPE_MISSING = 0.10
P_TYPE_WRONG = 0.03
P_TYPE_SYNONYM = 0.30  # of correct labels of a type that has a synonym
P_TYPE_IN_TITLE = 0.92
P_WRONG_VALUE = 0.05
P_VALUE_VARIANT = 0.05
P_WITHHELD = 0.05
P_TYPE_HAS_SYNONYM = 0.20
P_TEXTS = 0.30
P_BEHAVIOR = 0.85
P_COPURCHASE_HOLDOUT = 0.10
P_BRAND_COLUMN = 0.95
MAX_TITLE_ATTRS = 4
P_NO_DESCRIPTION = 0.03
TYPE_ZIPF = 0.9  # exponent of the type distribution (values: 0.8-1.4 per type and attribute)

# ---- vocabularies ----------------------------------------------------------------------------
COLORS = [
    "Black", "White", "Gray", "Navy Blue", "Red", "Blue", "Green", "Beige", "Pink", "Purple",
    "Brown", "Silver", "Gold", "Teal", "Olive", "Charcoal", "Burgundy", "Yellow", "Orange",
    "Ivory", "Khaki", "Turquoise", "Coral", "Lavender",
]
VOCAB: dict[str, list[str]] = {
    "Color": COLORS,
    "Color:ink": ["Black", "Blue", "Red", "Green", "Purple", "Assorted Colors"],
    "Color:toy": ["Multicolor", "Red", "Blue", "Pink", "Green", "Yellow", "Natural"],
    "Size:apparel": ["X-Small", "Small", "Medium", "Large", "X-Large", "XX-Large"],
    "Size:shoe": [f"Size {x:g}" for x in np.arange(5, 14, 0.5)],
    "Size:generic": ["Small", "Medium", "Large", "X-Large", "Jumbo"],
    "Size:hat": ["One Size", "Small/Medium", "Large/X-Large"],
    "Size:diaper": ["Size 1", "Size 2", "Size 3", "Size 4", "Size 5", "Size 6", "Preemie"],
    "Size:ball": ["Size 3", "Size 4", "Size 5", "Size 6", "Size 7", "Official Size"],
    "Size:cookware": ["8 inch", "10 inch", "12 inch", "14 inch", "9 x 13 inch"],
    "Size:paper": ["A5", "A4", "Letter", "Legal", "8.5 x 11 inch", "5 x 8 inch"],
    "Size:doll": ["8 inch", "12 inch", "14 inch", "18 inch"],
    "Size:planter": ["6 inch", "8 inch", "10 inch", "12 inch", "16 inch"],
    "Flavor:tea": ["Mint", "Lemon", "Peach", "Honey", "Ginger", "Berry", "Vanilla", "Cinnamon",
                   "Original", "Hibiscus", "Lemon Ginger", "Raspberry", "Orange Spice"],
    "Flavor:coffee": ["Original", "Vanilla", "Hazelnut", "Caramel", "Mocha", "Pumpkin Spice",
                      "French Vanilla", "Cinnamon", "Toffee"],
    "Flavor:sweet": ["Chocolate Chip", "Peanut Butter", "Honey Oat", "Almond", "Blueberry",
                     "Cinnamon", "Strawberry", "Dark Chocolate", "Coconut", "Apple Cinnamon"],
    "Flavor:savory": ["Original", "Sea Salt", "BBQ", "Sour Cream & Onion", "Cheddar",
                      "Salt & Vinegar", "Jalapeno", "Ranch", "Lime", "Spicy"],
    "Flavor:pet": ["Chicken", "Beef", "Salmon", "Lamb", "Turkey", "Duck", "Whitefish",
                   "Chicken & Rice"],
    "Flavor:toothpaste": ["Mint", "Fresh Mint", "Cool Mint", "Cinnamon", "Bubble Gum",
                          "Spearmint", "Wintergreen"],
    "Flavor:supplement": ["Unflavored", "Chocolate", "Vanilla", "Strawberry", "Orange", "Berry",
                          "Lemon", "Tropical Punch"],
    "Scent:home": ["Lavender", "Fresh Linen", "Unscented", "Citrus", "Ocean Breeze", "Vanilla",
                   "Eucalyptus", "Lemon", "Apple Cinnamon", "Spring Meadow", "Pine",
                   "Mountain Air", "Sandalwood"],
    "Scent:personal": ["Lavender", "Coconut", "Unscented", "Citrus", "Cucumber", "Aloe", "Rose",
                       "Sandalwood", "Tea Tree", "Vanilla", "Shea Butter", "Fresh"],
    "Material:apparel": ["Cotton", "Polyester", "Wool", "Linen", "Nylon", "Spandex",
                         "Cotton Blend", "Merino Wool", "Organic Cotton", "Rayon"],
    "Material:footwear": ["Mesh", "Leather", "Synthetic", "Suede", "Knit", "Canvas", "Rubber"],
    "Material:hard": ["Stainless Steel", "Plastic", "Aluminum", "Glass", "Ceramic", "Silicone",
                      "Bamboo", "Wood", "Cast Iron", "Copper", "Carbon Steel", "Tritan"],
    "Material:gear": ["Nylon", "Polyester", "Canvas", "Ripstop Nylon", "PVC", "TPE",
                      "Natural Rubber", "Cork"],
    "Material:textile": ["Cotton", "Microfiber", "Polyester", "Bamboo", "Fleece", "Terry Cloth",
                         "Canvas"],
    "Material:wax": ["Soy Wax", "Paraffin", "Beeswax", "Coconut Wax"],
    "Material:ball": ["Rubber", "Synthetic Leather", "Composite Leather", "Felt", "PU Leather"],
    "Material:blade": ["Stainless Steel", "Carbon Steel", "Damascus Steel", "Ceramic",
                       "High Carbon Steel"],
    "Material:toy": ["Rubber", "Nylon", "Plush", "Rope", "TPR", "Wood", "Plastic"],
    "Material:hose": ["Rubber", "Vinyl", "PVC", "Latex", "Polyurethane"],
    "Material:planter": ["Plastic", "Ceramic", "Terracotta", "Resin", "Metal", "Wood", "Fabric"],
    "Volume": ["8 fl oz", "12 fl oz", "16 fl oz", "20 fl oz", "24 fl oz", "32 fl oz", "64 fl oz",
               "100 ml", "250 ml", "500 ml", "750 ml", "1 L", "2 L"],
    "Weight:food": ["4 oz", "8 oz", "12 oz", "16 oz", "24 oz", "1 lb", "2 lb", "5 lb", "250 g",
                    "500 g", "1 kg"],
    "Weight:small": ["3 oz", "4 oz", "4.1 oz", "5 oz", "6 oz", "100 g", "2.6 oz"],
    "Weight:pet": ["3 lb", "5 lb", "15 lb", "30 lb", "40 lb", "10 kg", "20 lb"],
    "Weight:gear": ["2 lb", "3.5 lb", "5 lb", "8 lb", "12 lb", "20 lb"],
    "Weight:paper": ["20 lb", "24 lb", "28 lb", "65 lb", "110 lb"],
    "Weight:seed": ["1 oz", "4 oz", "1 lb", "5 lb", "10 lb"],
    "Pack Size": ["1 Pack", "2 Pack", "3 Pack", "4 Pack", "6 Pack", "8 Pack", "12 Pack",
                  "24 Pack"],
    "Count": ["10 Count", "20 Count", "24 Count", "30 Count", "40 Count", "50 Count", "60 Count",
              "100 Count", "120 Count", "200 Count"],
    "Length:cable": ["1 ft", "3 ft", "6 ft", "10 ft", "15 ft", "0.5 m", "1 m", "2 m", "3 m"],
    "Length:hose": ["25 ft", "50 ft", "75 ft", "100 ft"],
    "Length:blade": ["3.5 inch", "5 inch", "6 inch", "8 inch", "10 inch"],
    "Length:wiper": ["16 inch", "18 inch", "20 inch", "22 inch", "24 inch", "26 inch"],
    "Length:tape": ["10 yd", "20 yd", "30 yd", "55 yd", "60 yd", "110 yd"],
    "Wattage:small": ["5 W", "10 W", "15 W", "20 W", "30 W", "45 W", "65 W", "100 W"],
    "Wattage:appliance": ["300 W", "600 W", "900 W", "1000 W", "1200 W", "1500 W"],
    "Connectivity": ["Bluetooth 5.0", "Bluetooth 5.3", "Wi-Fi", "USB-C", "Wired",
                     "2.4 GHz Wireless"],
    "Age Range": ["Ages 2-4", "Ages 3+", "Ages 5+", "Ages 8+", "Ages 12+", "Ages 14+", "Adult"],
    "Pieces": ["24 Pieces", "100 Pieces", "300 Pieces", "500 Pieces", "750 Pieces",
               "1000 Pieces", "1500 Pieces", "2000 Pieces"],
    "Gender": ["Men's", "Women's", "Unisex", "Boys'", "Girls'", "Kids'"],
    "Diet Type": ["Organic", "Gluten Free", "Non-GMO", "Vegan", "Keto", "Sugar Free", "Kosher",
                  "Low Sodium"],
    "Hair Type": ["All Hair Types", "Curly Hair", "Dry Hair", "Fine Hair", "Color Treated Hair",
                  "Oily Hair"],
    "Skin Type": ["All Skin Types", "Dry Skin", "Sensitive Skin", "Oily Skin", "Normal Skin",
                  "Combination Skin"],
    "SPF": ["SPF 15", "SPF 30", "SPF 50", "SPF 70", "SPF 100"],
    "Life Stage": ["Puppy", "Adult", "Senior", "All Life Stages"],
    "Life Stage:cat": ["Kitten", "Adult", "Senior", "All Life Stages"],
    "Breed Size": ["Small Breed", "Medium Breed", "Large Breed", "All Breed Sizes"],
    "Capacity:drink": ["12 oz", "16 oz", "20 oz", "24 oz", "32 oz", "40 oz", "64 oz", "500 ml",
                       "750 ml", "1 L"],
    "Capacity:backpack": ["15 L", "20 L", "25 L", "30 L", "40 L", "50 L", "65 L"],
    "Capacity:tent": ["1 Person", "2 Person", "3 Person", "4 Person", "6 Person", "8 Person"],
    "Capacity:bag": ["4 Gallon", "8 Gallon", "13 Gallon", "30 Gallon", "33 Gallon", "39 Gallon",
                     "55 Gallon"],
    "Strength": ["250 mg", "500 mg", "1000 mg", "2000 IU", "5000 IU", "50 mcg", "10 g"],
    "Roast": ["Light Roast", "Medium Roast", "Dark Roast", "Medium-Dark Roast"],
    "Pattern": ["Solid", "Striped", "Plaid", "Floral", "Camo", "Heather", "Checkered",
                "Polka Dot"],
    "Fit": ["Slim Fit", "Regular Fit", "Relaxed Fit", "Athletic Fit", "Classic Fit"],
    "Caffeine Content": ["Caffeinated", "Decaf", "Caffeine Free", "Half Caff"],
    "Heat Level": ["Mild", "Medium", "Hot", "Extra Hot"],
    "Thickness": ["1/8 inch", "1/4 inch", "6 mm", "8 mm", "10 mm", "1/2 inch"],
    "Battery Life": ["8 Hours", "12 Hours", "20 Hours", "30 Hours", "40 Hours", "60 Hours"],
    "Layout": ["Full Size", "Tenkeyless", "Compact 75%", "Compact 65%"],
    "Point Size": ["0.5 mm", "0.7 mm", "1.0 mm", "Fine Point", "Medium Point", "Bold Point"],
    "NPK Ratio": ["10-10-10", "20-20-20", "16-4-8", "24-8-16", "3-4-4", "12-4-8"],
    "Number of Players": ["1 Player", "2 Players", "2-4 Players", "2-6 Players", "4+ Players"],
}

# (department, head noun = category, modifiers, attributes: "Name" or "Name:vocab"); the first
# two attributes (after Brand) apply to every type of the category, the others to some.
CATEGORIES: list[tuple[str, str, list[str], list[str]]] = [
    ("grocery", "tea", ["green", "black", "herbal", "chai", "oolong", "white", "jasmine",
                        "rooibos", "matcha", "earl grey", "peppermint", "chamomile", "iced"],
     ["Flavor:tea", "Count", "Diet Type", "Caffeine Content", "Pack Size"]),
    ("grocery", "coffee", ["ground", "whole bean", "instant", "espresso", "cold brew",
                           "single origin", "breakfast blend", "colombian"],
     ["Roast", "Weight:food", "Flavor:coffee", "Caffeine Content", "Diet Type", "Pack Size"]),
    ("grocery", "snack bar", ["protein", "granola", "energy", "fruit", "nut", "breakfast", "oat"],
     ["Flavor:sweet", "Count", "Diet Type", "Weight:food"]),
    ("grocery", "chips", ["potato", "tortilla", "kettle", "veggie", "pita", "plantain", "corn"],
     ["Flavor:savory", "Weight:food", "Pack Size", "Diet Type"]),
    ("grocery", "sauce", ["pasta", "hot", "barbecue", "soy", "teriyaki", "alfredo", "pesto",
                          "marinara", "enchilada"],
     ["Weight:food", "Diet Type", "Heat Level", "Pack Size"]),
    ("grocery", "juice", ["orange", "apple", "grape", "cranberry", "tomato", "lemon", "pineapple",
                          "mango"],
     ["Volume", "Pack Size", "Diet Type"]),
    ("grocery", "cereal", ["bran", "oat", "rice", "wheat", "corn", "multigrain", "granola"],
     ["Weight:food", "Flavor:sweet", "Diet Type", "Pack Size"]),
    ("grocery", "oil", ["olive", "coconut", "avocado", "canola", "sesame", "vegetable",
                        "sunflower", "extra virgin olive"],
     ["Volume", "Diet Type", "Pack Size"]),
    ("household supplies", "detergent", ["laundry", "dish", "dishwasher", "liquid laundry",
                                         "powder laundry", "baby laundry", "high efficiency"],
     ["Scent:home", "Volume", "Count", "Pack Size"]),
    ("household supplies", "cleaner", ["glass", "bathroom", "floor", "kitchen", "all purpose",
                                       "oven", "carpet", "toilet bowl"],
     ["Scent:home", "Volume", "Pack Size"]),
    ("household supplies", "towel", ["paper", "bath", "hand", "beach", "kitchen", "dish"],
     ["Color", "Count", "Material:textile", "Pack Size", "Size:generic"]),
    ("household supplies", "trash bag", ["kitchen", "outdoor", "compactor", "recycling",
                                         "lawn and leaf", "contractor", "drawstring"],
     ["Capacity:bag", "Count", "Scent:home", "Color"]),
    ("household supplies", "candle", ["scented", "pillar", "jar", "tea light", "votive", "taper",
                                      "flameless"],
     ["Scent:home", "Color", "Material:wax", "Pack Size"]),
    ("beauty & personal care", "shampoo", ["dry", "clarifying", "dandruff", "volumizing",
                                           "moisturizing", "baby", "anti frizz", "color safe"],
     ["Hair Type", "Volume", "Scent:personal", "Pack Size"]),
    ("beauty & personal care", "conditioner", ["leave in", "deep", "moisturizing", "detangling",
                                               "volumizing", "hydrating"],
     ["Hair Type", "Volume", "Scent:personal", "Pack Size"]),
    ("beauty & personal care", "lotion", ["body", "hand", "face", "baby", "tanning", "after sun",
                                          "foot"],
     ["Skin Type", "Volume", "Scent:personal", "SPF", "Pack Size"]),
    ("beauty & personal care", "soap", ["bar", "hand", "liquid hand", "castile", "glycerin",
                                        "oatmeal", "foaming hand", "antibacterial"],
     ["Scent:personal", "Volume", "Pack Size", "Skin Type"]),
    ("beauty & personal care", "toothpaste", ["whitening", "sensitive", "kids", "fluoride",
                                              "charcoal", "herbal", "tartar control"],
     ["Flavor:toothpaste", "Weight:small", "Pack Size"]),
    ("beauty & personal care", "deodorant", ["stick", "spray", "natural", "gel", "roll on",
                                             "clinical strength", "aluminum free"],
     ["Scent:personal", "Gender", "Weight:small", "Pack Size"]),
    ("sports & outdoors", "shoe", ["trail running", "running", "walking", "basketball", "tennis",
                                   "hiking", "cycling", "golf", "soccer", "training"],
     ["Size:shoe", "Color", "Gender", "Material:footwear"]),
    ("sports & outdoors", "bottle", ["water", "insulated water", "sports", "shaker",
                                     "glass water", "kids water", "collapsible water"],
     ["Capacity:drink", "Color", "Material:hard", "Pack Size"]),
    ("sports & outdoors", "backpack", ["hiking", "school", "laptop", "hydration", "travel",
                                       "rolling", "anti theft", "camping"],
     ["Capacity:backpack", "Color", "Material:gear", "Gender"]),
    ("sports & outdoors", "mat", ["yoga", "exercise", "pilates", "camping", "picnic"],
     ["Color", "Thickness", "Material:gear"]),
    ("sports & outdoors", "tent", ["camping", "backpacking", "dome", "pop up", "beach", "cabin",
                                   "instant"],
     ["Capacity:tent", "Color", "Material:gear", "Weight:gear"]),
    ("sports & outdoors", "ball", ["soccer", "basketball", "tennis", "golf", "volleyball",
                                   "football", "pickleball"],
     ["Size:ball", "Color", "Pack Size", "Material:ball"]),
    ("clothing", "shirt", ["dress", "polo", "flannel", "oxford", "hawaiian", "button down",
                           "henley", "graphic"],
     ["Size:apparel", "Color", "Gender", "Material:apparel", "Fit", "Pattern"]),
    ("clothing", "jacket", ["rain", "down", "denim", "leather", "fleece", "bomber", "ski",
                            "softshell", "puffer"],
     ["Size:apparel", "Color", "Gender", "Material:apparel", "Fit"]),
    ("clothing", "socks", ["athletic", "dress", "wool", "compression", "ankle", "crew", "hiking",
                           "no show"],
     ["Size:apparel", "Color", "Pack Size", "Gender", "Material:apparel", "Pattern"]),
    ("clothing", "pants", ["cargo", "yoga", "dress", "hiking", "jogger", "chino", "work", "ski"],
     ["Size:apparel", "Color", "Gender", "Material:apparel", "Fit"]),
    ("clothing", "hat", ["sun", "bucket", "winter", "cowboy", "trucker", "baseball", "straw"],
     ["Color", "Gender", "Material:apparel", "Size:hat"]),
    ("pet supplies", "dog food", ["dry", "wet", "grain free", "raw", "freeze dried",
                                  "limited ingredient", "high protein"],
     ["Flavor:pet", "Weight:pet", "Life Stage", "Breed Size"]),
    ("pet supplies", "cat food", ["dry", "wet", "indoor", "hairball control", "grain free",
                                  "sensitive stomach"],
     ["Flavor:pet", "Weight:pet", "Life Stage:cat"]),
    ("pet supplies", "cat litter", ["clumping", "clay", "crystal", "pine", "multi cat",
                                    "lightweight"],
     ["Scent:home", "Weight:pet"]),
    ("pet supplies", "dog bed", ["orthopedic", "memory foam", "elevated", "bolster", "donut",
                                 "calming", "waterproof"],
     ["Size:generic", "Color", "Material:textile"]),
    ("pet supplies", "dog toy", ["chew", "squeaky", "rope", "plush", "puzzle", "fetch", "tug"],
     ["Size:generic", "Color:toy", "Material:toy", "Pack Size"]),
    ("electronics", "cable", ["usb c", "hdmi", "lightning", "ethernet", "micro usb", "aux",
                              "displayport", "charging"],
     ["Length:cable", "Color", "Pack Size"]),
    ("electronics", "charger", ["wall", "car", "wireless", "usb c", "laptop", "fast",
                                "portable"],
     ["Wattage:small", "Color", "Pack Size"]),
    ("electronics", "headphones", ["wireless", "noise cancelling", "gaming", "bluetooth",
                                   "studio", "kids", "over ear", "sport"],
     ["Color", "Connectivity", "Battery Life"]),
    ("electronics", "speaker", ["bluetooth", "portable", "smart", "bookshelf", "outdoor",
                                "waterproof", "shower", "party"],
     ["Color", "Connectivity", "Wattage:small", "Battery Life"]),
    ("electronics", "mouse", ["wireless", "gaming", "ergonomic", "bluetooth", "travel",
                              "vertical", "silent"],
     ["Color", "Connectivity", "Pack Size"]),
    ("electronics", "keyboard", ["mechanical", "wireless", "gaming", "ergonomic", "bluetooth",
                                 "backlit"],
     ["Color", "Connectivity", "Layout"]),
    ("kitchen & dining", "pan", ["frying", "saute", "grill", "sheet", "cake", "muffin",
                                 "roasting"],
     ["Material:hard", "Size:cookware", "Color", "Pack Size"]),
    ("kitchen & dining", "knife", ["chef", "paring", "bread", "steak", "santoku", "utility",
                                   "boning", "carving"],
     ["Material:blade", "Length:blade", "Color", "Pack Size"]),
    ("kitchen & dining", "mug", ["coffee", "travel", "camping", "espresso", "beer", "soup"],
     ["Capacity:drink", "Color", "Material:hard", "Pack Size"]),
    ("kitchen & dining", "blender", ["countertop", "personal", "immersion", "portable",
                                     "high speed", "smoothie"],
     ["Wattage:appliance", "Capacity:drink", "Color"]),
    ("kitchen & dining", "container", ["food storage", "meal prep", "lunch", "pantry",
                                       "freezer", "spice"],
     ["Capacity:drink", "Material:hard", "Pack Size", "Color"]),
    ("office products", "pen", ["ballpoint", "gel", "fountain", "felt tip", "rollerball",
                                "brush"],
     ["Color:ink", "Count", "Point Size"]),
    ("office products", "notebook", ["spiral", "composition", "dot grid", "pocket", "hardcover",
                                     "college ruled"],
     ["Size:paper", "Color", "Count", "Pack Size"]),
    ("office products", "paper", ["printer", "copy", "construction", "graph", "wrapping",
                                  "parchment", "tissue"],
     ["Count", "Size:paper", "Color", "Weight:paper"]),
    ("office products", "tape", ["packing", "masking", "duct", "electrical", "double sided",
                                 "washi", "painter's"],
     ["Length:tape", "Color", "Pack Size"]),
    ("toys & games", "puzzle", ["jigsaw", "floor", "brain teaser", "3d", "kids", "panoramic"],
     ["Pieces", "Age Range"]),
    ("toys & games", "doll", ["baby", "fashion", "rag", "paper", "nesting", "talking"],
     ["Age Range", "Size:doll", "Material:toy"]),
    ("toys & games", "blocks", ["building", "foam", "magnetic", "stacking", "alphabet"],
     ["Pieces", "Age Range", "Color:toy"]),
    ("toys & games", "game", ["board", "card", "party", "strategy", "trivia", "dice", "family"],
     ["Age Range", "Number of Players"]),
    ("baby", "diapers", ["overnight", "swim", "cloth", "pull up", "sensitive", "eco friendly"],
     ["Size:diaper", "Count", "Pack Size"]),
    ("baby", "wipes", ["baby", "disinfecting", "makeup remover", "hand", "lens", "flushable"],
     ["Count", "Scent:personal", "Pack Size"]),
    ("baby", "cup", ["sippy", "training", "straw", "snack", "suction"],
     ["Capacity:drink", "Color:toy", "Material:hard", "Age Range"]),
    ("patio & garden", "seeds", ["vegetable", "flower", "grass", "herb", "tomato", "wildflower",
                                 "sunflower"],
     ["Weight:seed", "Count", "Diet Type"]),
    ("patio & garden", "hose", ["garden", "expandable", "soaker", "kink free", "heavy duty"],
     ["Length:hose", "Color", "Material:hose"]),
    ("patio & garden", "fertilizer", ["lawn", "plant", "tomato", "rose", "liquid",
                                      "slow release", "orchid"],
     ["NPK Ratio", "Weight:pet", "Diet Type"]),
    ("patio & garden", "planter", ["hanging", "window box", "raised bed", "self watering",
                                   "tiered", "wall"],
     ["Material:planter", "Color", "Size:planter"]),
    ("automotive", "fluid", ["brake", "transmission", "power steering", "windshield washer",
                             "coolant"],
     ["Volume", "Pack Size"]),
    ("automotive", "cover", ["car", "seat", "steering wheel", "tire", "motorcycle"],
     ["Color", "Material:textile", "Size:generic"]),
    ("automotive", "wiper blades", ["windshield", "rear", "beam", "winter", "hybrid"],
     ["Length:wiper", "Pack Size"]),
    ("health & household", "vitamins", ["prenatal", "gummy", "chewable", "kids", "daily",
                                        "b complex"],
     ["Count", "Strength", "Flavor:supplement", "Diet Type"]),
    ("health & household", "supplement", ["protein", "fiber", "probiotic", "fish oil",
                                          "collagen", "iron", "magnesium", "turmeric"],
     ["Strength", "Count", "Flavor:supplement", "Diet Type"]),
    ("health & household", "bandage", ["adhesive", "elastic", "gauze", "waterproof", "fabric",
                                       "kids", "liquid"],
     ["Count", "Size:generic"]),
    ("health & household", "thermometer", ["digital", "ear", "forehead", "infrared", "oral",
                                           "meat", "basal"],
     ["Color", "Pack Size"]),
]
# a second parent for types whose modifier carries one of these words: (theme, its department)
THEMES: list[tuple[tuple[str, ...], str, str]] = [
    (("hiking", "camping", "trail running", "backpacking"), "outdoor gear", "sports & outdoors"),
    (("baby", "kids", "sippy"), "baby & kids essentials", "baby"),
    (("travel", "portable"), "travel essentials", "luggage & travel"),
    (("gaming",), "gaming accessories", "electronics"),
    (("wireless", "bluetooth"), "wireless accessories", "electronics"),
    (("herbal", "natural", "organic"), "natural products", "health & household"),
    (("kitchen", "meat"), "kitchen essentials", "kitchen & dining"),
]
BRAND_SYLLABLES = [
    "ac", "me", "zo", "ra", "vi", "ta", "lu", "mi", "no", "ke", "sol", "bri", "tex", "or", "quin",
    "vel", "dor", "pax", "ny", "ka", "lo", "ver", "den", "sa", "fi", "ro", "mar", "tel", "bo",
    "gen", "ix", "al", "ur", "em", "to", "ze", "ha", "pi", "cor", "lin",
]
BRAND_SUFFIXES = {
    "grocery": ["Farms", "Naturals", "Kitchen", "Organics"],
    "household supplies": ["Home", "Clean", "Co."],
    "beauty & personal care": ["Beauty", "Botanics", "Labs"],
    "sports & outdoors": ["Sport", "Outdoors", "Athletics"],
    "clothing": ["Apparel", "& Co.", "Wear"],
    "pet supplies": ["Pet", "Paws"],
    "electronics": ["Tech", "Audio", "Electronics"],
    "kitchen & dining": ["Kitchen", "Cookware", "Home"],
    "office products": ["Office", "Paper Co."],
    "toys & games": ["Toys", "Games", "Kids"],
    "baby": ["Baby", "Little Ones"],
    "patio & garden": ["Garden", "Grow", "Greens"],
    "automotive": ["Auto", "Motors"],
    "health & household": ["Health", "Nutrition", "Wellness"],
}
PRE_ATTRS = {"Gender", "Diet Type", "Roast", "Caffeine Content", "Life Stage", "Breed Size"}
EITHER_ATTRS = {"Color", "Flavor", "Scent", "Material", "Pattern"}  # before or after the type
P_TITLE = {
    "Brand": 0.9, "Flavor": 0.6, "Scent": 0.5, "Color": 0.5, "Size": 0.45, "Pack Size": 0.5,
    "Count": 0.5, "Volume": 0.45, "Weight": 0.45, "Gender": 0.6, "Diet Type": 0.45, "Roast": 0.6,
    "Capacity": 0.45, "Pieces": 0.5, "Caffeine Content": 0.35, "Life Stage": 0.5,
    "Breed Size": 0.4, "Length": 0.4, "Wattage": 0.35, "Connectivity": 0.35,
}
P_TITLE_DEFAULT = 0.25

# sentence templates; "{v}" is the value, "{a}" the attribute name in lower case
DESC_TEMPLATES = {
    "Color": ["Available in {v}.", "This one comes in {v}.", "The {v} color goes with everything."],
    "Flavor": ["Enjoy the {v} flavor.", "Flavor: {v}.", "Its {v} taste is a favorite."],
    "Scent": ["Scented with {v}.", "Scent: {v}.", "Leaves a light {v} scent."],
    "Size": ["Size: {v}.", "Choose {v} for the right fit.", "This listing is for {v}."],
    "Material": ["Made of {v}.", "Crafted from durable {v}.", "Material: {v}."],
    "Pack Size": ["Contains {v}.", "Each order includes {v}."],
    "Count": ["Contains {v}.", "Each box holds {v}."],
    "Volume": ["Net content: {v}.", "Each bottle holds {v}."],
    "Weight": ["Net weight: {v}.", "Weighs {v}."],
    "Capacity": ["Capacity: {v}.", "Holds up to {v}."],
    "Gender": ["Gender: {v}.", "Cut for {v} sizing."],
    "Diet Type": ["Certified {v}.", "{v} and made with simple ingredients."],
    "Roast": ["A smooth {v}.", "Roast level: {v}."],
    "Age Range": ["Recommended for {v}.", "Age: {v}."],
    "Connectivity": ["Connects via {v}.", "Connectivity: {v}."],
}
DESC_GENERIC = ["{A}: {v}.", "The {a} is {v}.", "It comes with a {a} of {v}."]
OPENERS_BRAND = [
    "This {type} from {brand} is built for everyday use.",
    "{brand} brings you a {type} you can count on.",
    "Meet the {brand} {type}.",
    "Discover the {type} by {brand}.",
]
OPENERS_PLAIN = [
    "This {type} is built for everyday use.",
    "A {type} you can count on.",
    "Looking for a reliable {type}? You found it.",
]
FILLERS = [
    "Perfect for everyday use.", "A great gift idea.", "Satisfaction guaranteed.",
    "Loved by thousands of customers.", "Easy to use and easy to store.",
    "Quality you can trust.", "Backed by our friendly customer service.",
    "Designed with care.", "Great value for the price.",
]
BULLET_FILLERS = [
    "Easy to use", "Great value", "Ideal gift", "Quality guaranteed", "Lightweight and durable",
    "Trusted brand", "Ships in recyclable packaging", "Easy to clean", "Compact design",
]
REVIEW_OPEN = ["Love it!", "Works as described.", "Pretty good overall.", "Not what I expected.",
               "Five stars.", "Would buy again.", "Decent for the price.", "Disappointed."]
REVIEW_VALUE = ["The {v} is exactly what I wanted.", "Ordered the {v} one and it arrived quickly.",
                "Really happy with the {v}.", "I wish the {a} was not {v}.",
                "{v} was the right choice for me."]
REVIEW_PLAIN = ["My family uses this {type} every day.", "Good quality {type}.",
                "This {type} broke after a month.", "Best {type} I have tried."]

_UNIT_RE = re.compile(
    r"^(\d+(?:\.\d+)?) (fl oz|oz|ml|L|lb|g|kg|ft|m|W|mg|IU|mcg|mm|inch|yd|Gallon|Hours)$"
)
_UNIT_ALIASES = {
    "fl oz": ["fl. oz.", "Fl Oz", "fluid ounces"], "oz": ["ounce", "Ounce", "OZ"],
    "ml": ["mL", "ML"], "L": ["liter", "Liter"], "lb": ["lbs", "pound", "LB"], "g": ["gram"],
    "kg": ["KG"], "ft": ["feet", "Feet", "FT"], "m": ["meter"], "W": ["Watt", "Watts"],
    "mg": ["MG"], "IU": ["iu"], "mcg": ["µg"], "mm": ["MM"], "inch": ["in", "Inch"],
    "yd": ["yards", "Yard"], "Gallon": ["gal", "Gal"], "Hours": ["hrs", "Hr"],
}
_SPECIAL_VARIANTS = {
    "Gray": ["Grey", "Gry"], "Black": ["Blk"], "White": ["Wht"], "Navy Blue": ["Navy"],
    "Silver": ["Slvr"], "Burgundy": ["Burgandy"], "Turquoise": ["Turqoise"],
    "Lavender": ["Lavendar"], "X-Small": ["XS"], "Small": ["S", "Sm"], "Medium": ["M", "Med"],
    "Large": ["L", "Lg"], "X-Large": ["XL"], "XX-Large": ["XXL", "2XL"], "Men's": ["Mens"],
    "Women's": ["Womens", "Ladies"], "Kids'": ["Kids"], "Boys'": ["Boys"], "Girls'": ["Girls"],
    "Gluten Free": ["Gluten-Free", "GF"], "Sugar Free": ["Sugar-Free"], "Non-GMO": ["Non GMO"],
    "Stainless Steel": ["Stainless", "SS"], "Polyester": ["Poly"], "Aluminum": ["Aluminium"],
    "USB-C": ["USB Type-C", "Type-C"], "Decaf": ["Decaffeinated"],
    "Caffeine Free": ["Caffeine-Free"], "Unscented": ["Fragrance Free"], "BBQ": ["Barbecue"],
    "Sour Cream & Onion": ["Sour Cream and Onion"], "Salt & Vinegar": ["Salt and Vinegar"],
    "Bubble Gum": ["Bubblegum"], "One Size": ["OS", "One Size Fits Most"],
    "Multicolor": ["Multi-Color", "Multi"], "Assorted Colors": ["Assorted"],
    "Chicken & Rice": ["Chicken and Rice"], "Wi-Fi": ["WiFi"], "Tenkeyless": ["TKL"],
}


def value_variants(value: str) -> tuple[list[str], list[str]]:
    """(spelling variants, case variants) of a canonical value: "16 oz" -> "16oz", "16 ounce"."""
    out: list[str] = list(_SPECIAL_VARIANTS.get(value, []))
    m = _UNIT_RE.match(value)
    if m:
        num, unit = m.groups()
        out.append(f"{num}{unit}")
        out += [f"{num} {u}" for u in _UNIT_ALIASES.get(unit, [])]
    for pat, fmt in (
        (r"^(\d+) Pack$", ["{0}-Pack", "Pack of {0}", "{0} pk"]),
        (r"^(\d+) Count$", ["{0} ct", "{0}-Count", "{0} Ct"]),
        (r"^(\d+) Pieces$", ["{0} pcs", "{0}-Piece", "{0} Piece"]),
        (r"^Size (\S+)$", ["Sz {0}", "Size: {0}"]),
        (r"^SPF (\d+)$", ["SPF{0}", "Spf {0}"]),
        (r"^(\d+) Person$", ["{0}-Person", "{0} Persons"]),
        (r"^Ages (\d+)\+$", ["{0}+ Years", "{0} Years and Up"]),
        (r"^(\S+) Roast$", ["{0}"]),
    ):
        m = re.match(pat, value)
        if m:
            out += [f.format(*m.groups()) for f in fmt]
    out = [v for v in dict.fromkeys(out) if v != value]
    case = [v for v in dict.fromkeys([value.lower(), value.upper()]) if v != value]
    return out, case


def _plural(name: str) -> str:
    if name.endswith(("s", "x", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def n_types_for(n_products: int) -> int:
    """Number of leaf types: sub-linear in N (~30 + 40 log10 N), at most 400."""
    n = round(30 + 40 * math.log10(max(n_products, 10)))
    n = min(n, max(20, n_products // 5))
    return int(max(12, min(n, 400)))


# ---- counter-based hashing: a product's type and popularity from its index alone ---------------
_M64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, stream: int) -> np.uint64:
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _M64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
    return np.uint64(z ^ (z >> 31))


def _uniform(seed: int, stream: int, idx: np.ndarray) -> np.ndarray:
    h = _mix64(idx.astype(np.uint64) ^ _key(seed, stream))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ---- the world: taxonomy, vocabularies and sampling tables ------------------------------------
class World:
    """Everything that does not depend on individual products; size depends on n_types only."""

    def __init__(self, seed: int, n_types: int):
        self.seed = seed
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, 1]))
        self._build_types(rng, n_types)
        self._build_attributes(rng)
        self._build_relations(rng)

    # taxonomy ------------------------------------------------------------------------------
    def _build_types(self, rng: np.random.Generator, n_types: int) -> None:
        cat_order = [int(i) for i in rng.permutation(len(CATEGORIES))]
        total_mods = sum(len(CATEGORIES[i][2]) for i in cat_order)
        n_types = min(n_types, total_mods)
        n_cat = int(np.clip(round(n_types / 5.5), 6, len(CATEGORIES)))
        chosen = cat_order[:n_cat]
        while sum(len(CATEGORIES[i][2]) for i in chosen) < n_types:
            chosen.append(cat_order[len(chosen)])
        mods = {c: [CATEGORIES[c][2][j] for j in rng.permutation(len(CATEGORIES[c][2]))]
                for c in chosen}
        picked: dict[int, list[str]] = {c: [] for c in chosen}
        k = 0
        while k < n_types:
            for c in chosen:
                if k < n_types and len(picked[c]) < len(mods[c]):
                    picked[c].append(mods[c][len(picked[c])])
                    k += 1
        self.cat_names = [CATEGORIES[c][1] for c in chosen]
        self.cat_dept = [CATEGORIES[c][0] for c in chosen]
        self.cat_spec = chosen  # index into CATEGORIES
        names, tcat = [], []
        for ci, c in enumerate(chosen):
            for m in picked[c]:
                names.append(f"{m} {CATEGORIES[c][1]}")
                tcat.append(ci)
        self.type_names = names
        self.type_cat = np.array(tcat, dtype=np.int32)
        self.type_mod = [n[: -len(self.cat_names[c]) - 1] for n, c in zip(names, tcat)]
        T = len(names)
        self.n_types = T
        # parents: the head-noun category, plus a theme for some (a DAG)
        self.parents: list[list[str]] = [[self.cat_names[c]] for c in tcat]
        self.themes: dict[str, str] = {}
        for t, mod in enumerate(self.type_mod):
            for words, theme, dept in THEMES:
                if any(re.search(rf"\b{re.escape(w)}\b", mod) for w in words):
                    self.parents[t].append(theme)
                    self.themes[theme] = dept
                    break
        # Zipf over types on a random order of ranks
        rank = rng.permutation(T)
        w = 1.0 / (rank + 1.0) ** TYPE_ZIPF
        self.type_p = w / w.sum()
        self.type_cdf = np.cumsum(self.type_p)
        self.type_cdf[-1] = 1.0
        # withheld types: some of the mid and tail ranks, never the last visible type of a category
        n_with = max(1, round(P_WITHHELD * T)) if T >= 10 else 0
        lo = min(10, T // 4)
        cand = [int(t) for t in rng.permutation(T) if rank[t] >= lo]
        left = {c: int((self.type_cat == c).sum()) for c in range(len(chosen))}
        self.withheld = np.zeros(T, dtype=bool)
        for t in cand:
            if self.withheld.sum() >= n_with:
                break
            c = int(self.type_cat[t])
            if left[c] > 1:
                self.withheld[t] = True
                left[c] -= 1
        self.siblings = [np.flatnonzero(self.type_cat == c) for c in range(len(chosen))]
        self.visible = np.flatnonzero(~self.withheld)
        # type synonyms: a hyphenated compound or a singular / plural form
        self.type_syn: list[str | None] = [None] * T
        for t in range(T):
            if self.withheld[t] or rng.random() >= P_TYPE_HAS_SYNONYM:
                continue
            mod, head = self.type_mod[t], self.cat_names[self.type_cat[t]]
            if " " in mod and rng.random() < 0.6:
                self.type_syn[t] = f"{mod.replace(' ', '-')} {head}"
            elif head.endswith("s") and not head.endswith("ss"):
                self.type_syn[t] = names[t][:-1]
            else:
                self.type_syn[t] = _plural(names[t])

    # attributes ----------------------------------------------------------------------------
    def _build_attributes(self, rng: np.random.Generator) -> None:
        attrs = ["Brand"]
        for c in self.cat_spec:
            for a in CATEGORIES[c][3]:
                name = a.split(":")[0]
                if name not in attrs:
                    attrs.append(name)
        self.attrs = attrs
        A = len(attrs)
        aidx = {a: i for i, a in enumerate(attrs)}
        self.values: list[str] = []
        self._vid: dict[str, int] = {}

        def vid(s: str) -> int:
            if s not in self._vid:
                self._vid[s] = len(self.values)
                self.values.append(s)
            return self._vid[s]

        # brands: per category, some shared within the department
        used: set[str] = set()

        def brand_name(dept: str) -> str:
            while True:
                n = 2 if rng.random() < 0.7 else 3
                s = "".join(BRAND_SYLLABLES[int(i)] for i in rng.integers(0, len(BRAND_SYLLABLES), n))
                s = s.capitalize()
                if rng.random() < 0.3:
                    sfx = BRAND_SUFFIXES.get(dept, ["Co."])
                    s = f"{s} {sfx[int(rng.integers(len(sfx)))]}"
                if s not in used and len(s) > 3:
                    used.add(s)
                    return s

        n_brands = 6 + self.n_types // 12
        dept_pool: dict[str, list[str]] = {}
        cat_vocab: list[dict[int, list[int]]] = []  # per category: attr -> value ids
        for ci, c in enumerate(self.cat_spec):
            dept = self.cat_dept[ci]
            pool = dept_pool.setdefault(dept, [brand_name(dept) for _ in range(8)])
            n_shared = int(rng.integers(1, 4))
            brands = [pool[int(i)] for i in rng.choice(len(pool), n_shared, replace=False)]
            brands += [brand_name(dept) for _ in range(n_brands - n_shared)]
            voc = {0: [vid(b) for b in brands]}
            for a in CATEGORIES[c][3]:
                voc[aidx[a.split(":")[0]]] = [vid(v) for v in VOCAB[a]]
            cat_vocab.append(voc)
        self.cat_vocab = cat_vocab
        # every vocabulary of an attribute, for wrong values "from another type's vocabulary"
        attr_all: list[set[int]] = [set() for _ in range(A)]
        for voc in cat_vocab:
            for a, vs in voc.items():
                attr_all[a].update(vs)
        self.attr_all = [np.array(sorted(s), dtype=np.int32) for s in attr_all]

        T = self.n_types
        maxv = max(len(vs) for voc in cat_vocab for vs in voc.values())
        self.maxv = maxv
        self.app = np.zeros((T, A), dtype=bool)
        self.fill = np.zeros((T, A), dtype=np.float64)
        self.vals = np.full((T, A, maxv), -1, dtype=np.int32)
        self.nvals = np.zeros((T, A), dtype=np.int32)
        cdf = np.ones((T, A, maxv), dtype=np.float64)
        for t in range(T):
            ci = int(self.type_cat[t])
            spec = CATEGORIES[self.cat_spec[ci]][3]
            core = {0} | {aidx[a.split(":")[0]] for a in spec[:2]}
            for a, vs in cat_vocab[ci].items():
                if a not in core and rng.random() >= 0.6:
                    continue
                self.app[t, a] = True
                self.fill[t, a] = rng.uniform(0.6, 0.95) if a in core else rng.uniform(0.35, 0.85)
                k = len(vs) if len(vs) <= 4 else int(rng.integers(max(3, int(0.6 * len(vs))), len(vs) + 1))
                sub = [vs[int(i)] for i in rng.permutation(len(vs))[:k]]
                s = rng.uniform(0.8, 1.4)
                w = 1.0 / np.arange(1, k + 1) ** s
                self.vals[t, a, :k] = sub
                self.nvals[t, a] = k
                c = np.cumsum(w / w.sum())
                c[-1] = 1.0
                cdf[t, a, :k] = c
        # flattened, row-shifted CDF: one searchsorted samples every (type, attribute) at once
        self._cdf_flat = (cdf + np.arange(T * A, dtype=np.float64).reshape(T, A, 1)).ravel()
        self.p_title = np.array([P_TITLE.get(a, P_TITLE_DEFAULT) for a in attrs])
        self.pos = np.array([2 if a in PRE_ATTRS else 1 if a in EITHER_ATTRS else 0 for a in attrs])
        self.a_lower = [a.lower() for a in attrs]
        self.desc_tpl = [[_split_tpl(_article(x.replace("{A}", a).replace("{a}", a.lower())))
                          for x in DESC_TEMPLATES.get(a, DESC_GENERIC)] for a in attrs]
        self.variants = [value_variants(v) for v in self.values]
        self._wrong_cache: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def sample_values(self, t: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Value ids (n, A) for types t (n,) from uniforms u (n, A); -1 where not applicable."""
        n, A = u.shape
        row = (t[:, None].astype(np.int64) * A + np.arange(A)[None, :])
        pos = np.searchsorted(self._cdf_flat, row + u, side="right") - row * self.maxv
        pos = np.minimum(pos, np.maximum(self.nvals[t] - 1, 0))
        v = np.take_along_axis(self.vals[t], pos[:, :, None], axis=2)[:, :, 0]
        return np.where(self.app[t], v, -1)

    def wrong_pools(self, t: int, a: int) -> tuple[list[int], list[int]]:
        """(same attribute from other vocabularies, other attributes of the type) for (t, a)."""
        key = (t, a)
        if key not in self._wrong_cache:
            ci = int(self.type_cat[t])
            own = set(self.cat_vocab[ci].get(a, []))
            same = [int(v) for v in self.attr_all[a] if int(v) not in own]
            other = sorted({v for b, vs in self.cat_vocab[ci].items() if b not in (0, a)
                            for v in vs if v not in own})
            self._wrong_cache[key] = (same, other)
        return self._wrong_cache[key]

    # relations between types ---------------------------------------------------------------
    def _build_relations(self, rng: np.random.Generator) -> None:
        C = len(self.cat_names)
        comp_cats: list[list[int]] = []
        for c in range(C):
            same = [d for d in range(C) if d != c and self.cat_dept[d] == self.cat_dept[c]]
            other = [d for d in range(C) if d != c and self.cat_dept[d] != self.cat_dept[c]]
            out: list[int] = []
            for _ in range(int(rng.integers(1, 3))):
                pool = same if (same and rng.random() < 0.6) else other
                pool = [d for d in pool if d not in out]
                if pool:
                    out.append(pool[int(rng.integers(len(pool)))])
            comp_cats.append(out)
        comp: list[list[int]] = [[] for _ in range(self.n_types)]
        for t in range(self.n_types):
            for d in comp_cats[int(self.type_cat[t])]:
                sib = self.siblings[d]
                for u in rng.choice(sib, min(len(sib), int(rng.integers(1, 3))), replace=False):
                    if len(comp[t]) < 3 and int(u) not in comp[t]:
                        comp[t].append(int(u))
        for t in range(self.n_types):  # directed: never both a -> b and b -> a
            for u in list(comp[t]):
                if t in comp[u]:
                    if rng.random() < 0.5:
                        comp[t].remove(u)
                    else:
                        comp[u].remove(t)
        self.comp = np.full((self.n_types, 3), -1, dtype=np.int64)
        self.comp_n = np.array([len(c) for c in comp], dtype=np.int64)
        for t, c in enumerate(comp):
            self.comp[t, : len(c)] = c

    # product-level hashes ------------------------------------------------------------------
    def type_of(self, idx: np.ndarray) -> np.ndarray:
        u = _uniform(self.seed, 11, idx)
        return np.minimum(np.searchsorted(self.type_cdf, u, side="right"), self.n_types - 1)

    def popularity_of(self, idx: np.ndarray) -> np.ndarray:
        u = _uniform(self.seed, 12, idx)
        return np.minimum((1.0 - u) ** (-1.0 / 1.3), 500.0)  # Pareto, heavy tail

    # the taxonomy tables -------------------------------------------------------------------
    def taxonomy_rows(self) -> list[tuple[str, str | None]]:
        depts = list(dict.fromkeys(self.cat_dept + list(self.themes.values())))
        rows: list[tuple[str, str | None]] = [(d, None) for d in depts]
        rows += list(zip(self.cat_names, self.cat_dept))
        rows += sorted(self.themes.items())
        for t in range(self.n_types):
            if not self.withheld[t]:
                rows += [(self.type_names[t], p) for p in self.parents[t]]
        return rows

    def hypernym_rows(self) -> list[tuple[str, str, str, int]]:
        return [(self.type_names[t], "type", p, 1)
                for t in np.flatnonzero(self.withheld) for p in self.parents[t]]


def _split_tpl(tpl: str) -> list[tuple[bool, str]]:
    """"Made of {v}." -> [(False, "Made of "), (True, "v"), (False, ".")]"""
    out = []
    for i, part in enumerate(re.split(r"\{(\w+)\}", tpl)):
        if part:
            out.append((i % 2 == 1, part))
    return out


_OPEN_BRAND = [_split_tpl(x) for x in OPENERS_BRAND]
_OPEN_PLAIN = [_split_tpl(x) for x in OPENERS_PLAIN]


def _article(s: str) -> str:
    """"a" -> "an" before a vowel, inside a template."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", s)


def _title_case(s: str) -> str:
    # length-preserving (str.title would turn "Men's" into "Men'S")
    return " ".join(w[:1].upper() + w[1:] for w in s.split(" "))


# ---- one block of products -------------------------------------------------------------------
def _pick(rnd, seq):
    return seq[int(rnd() * len(seq))]


def _pid(i: int) -> str:
    return f"p{i:010d}"


def generate_block(world: World, block: int, n_total: int, n: int = GEN_BLOCK) -> dict:
    """Products block*GEN_BLOCK … +n-1 (n <= GEN_BLOCK) and everything that hangs off them.

    Every random draw is made for the full block (or from its own stream), so the first n
    products of a block are the same whatever n is: product i depends only on the seed, the
    world and i (and its co-purchase partners on n_total, the range they are drawn from).
    Returns {table: (pa.Table, owner)} where owner (int64, ascending) is the product offset in
    the block that each row belongs to, plus "_used": the synonyms used.
    """
    W = world
    nb = GEN_BLOCK
    n = min(n, nb)
    start = block * nb
    ss = np.random.SeedSequence([W.seed, 0xB10C, block])
    rng, rng_q, rng_c, rng_b, rng_co, rng_h, rng_n = (np.random.default_rng(s) for s in ss.spawn(7))
    py = random.Random(int(ss.generate_state(1, np.uint64)[0]))
    rnd = py.random
    A = len(W.attrs)
    idx = np.arange(start, start + nb, dtype=np.int64)
    t = W.type_of(idx)
    pop = W.popularity_of(idx)
    app = W.app[t]
    V = W.sample_values(t, rng.random((nb, A)))
    struct = app & (rng.random((nb, A)) < W.fill[t])
    struct[:, 0] = False  # the brand has its own column
    in_title = app & (rng.random((nb, A)) < W.p_title[None, :])
    in_desc = app & ((rng.random((nb, A)) < 0.3) | (~struct & ~in_title & (rng.random((nb, A)) < 0.8)))
    no_desc = rng.random(nb) < P_NO_DESCRIPTION
    in_desc &= ~no_desc[:, None]
    variant = rng.random((nb, A)) < P_VALUE_VARIANT
    pre_either = rng.random((nb, A)) < 0.35
    brand_col = rng.random(nb) < P_BRAND_COLUMN
    withheld = W.withheld[t]
    type_in_title = withheld | (rng.random(nb) < P_TYPE_IN_TITLE)
    u_pt = rng.random(nb)
    pt_mode = np.where(withheld | (u_pt < P_TYPE_MISSING), 0,
                       np.where(u_pt < P_TYPE_MISSING + P_TYPE_WRONG, 2, 1))  # 0 null 1 ok 2 wrong
    wrong = rng.random(nb) < P_WRONG_VALUE
    casing = rng.choice(4, nb, p=[0.55, 0.27, 0.08, 0.10])  # title words, as is, upper, lower
    template = rng.integers(0, 5, nb)
    has_texts = rng.random(nb) < P_TEXTS
    has_beh = rng.random(nb) < P_BEHAVIOR
    n_queries = np.minimum(1 + rng.poisson(1.3, nb), 5)
    n_out = np.minimum(rng.poisson(0.5 * np.sqrt(pop)), 6)
    (idx, t, pop, V, struct, in_title, in_desc, variant, pre_either, brand_col, type_in_title,
     pt_mode, wrong, casing, template, has_texts, has_beh, n_queries, n_out, no_desc) = (
        x[:n] for x in (idx, t, pop, V, struct, in_title, in_desc, variant, pre_either, brand_col,
                        type_in_title, pt_mode, wrong, casing, template, has_texts, has_beh,
                        n_queries, n_out, no_desc))

    values, names, tnames, cnames = W.values, W.attrs, W.type_names, W.cat_names
    type_syn, variants, a_lower = W.type_syn, W.variants, W.a_lower
    pos_kind = W.pos
    ids = [_pid(i) for i in range(start, start + n)]

    p_title, p_desc, p_bullets, p_type, p_brand = [], [], [], [], []
    at_off, at_name, at_val = [0], [], []
    gt_start, gt_end = [], []
    sp_owner, sp_attr, sp_val, sp_field, sp_start, sp_end = [], [], [], [], [], []
    wv_owner, wv_attr, wv_val, wv_corr = [], [], [], []
    tx_owner, tx_kind, tx_text = [], [], []
    q_owner, q_text = [], []
    used_val: set[tuple[str, str, str]] = set()
    used_type: set[tuple[str, str]] = set()

    t_l = t.tolist()
    V_l = V.tolist()
    struct_l, title_l, desc_l = struct.tolist(), in_title.tolist(), in_desc.tolist()
    variant_l, pre_l = variant.tolist(), pre_either.tolist()
    brand_col_l, tit_l, ptm_l = brand_col.tolist(), type_in_title.tolist(), pt_mode.tolist()
    wrong_l, casing_l, tpl_l = wrong.tolist(), casing.tolist(), template.tolist()
    texts_l, beh_l, nq_l = has_texts.tolist(), has_beh.tolist(), n_queries.tolist()
    pos_l = pos_kind.tolist()
    no_desc_l = no_desc.tolist()

    for i in range(n):
        ti = t_l[i]
        vrow = V_l[i]
        tname = tnames[ti]
        cat = int(W.type_cat[ti])
        brand = values[vrow[0]]
        srow, trow, drow = struct_l[i], title_l[i], desc_l[i]
        present = [a for a in range(1, A) if vrow[a] >= 0]
        spans: list[tuple[int, str, str, int, int]] = []  # attr, value, field, start, end

        # ---- title
        tattrs = [a for a in present if trow[a]][:MAX_TITLE_ATTRS]
        pre = [a for a in tattrs if pos_l[a] == 2 or (pos_l[a] == 1 and pre_l[i][a])]
        post = [a for a in tattrs if a not in pre]
        parts: list[str] = []
        cur = 0
        has_brand_t = trow[0]
        tpl = tpl_l[i]
        if tpl == 2 and not has_brand_t:
            tpl = 0
        type_span = None

        def put(s: str, a: int = -2) -> None:
            nonlocal cur, type_span
            if a >= 0:
                spans.append((a, values[vrow[a]], "title", cur, cur + len(s)))
            elif a == -1:
                type_span = (cur, cur + len(s))
            parts.append(s)
            cur += len(s)

        if has_brand_t and tpl != 2:
            put(brand, 0)
            put(" | " if tpl == 4 else " ")
        for a in pre:
            put(values[vrow[a]], a)
            put(" ")
        if tit_l[i]:
            put(tname, -1)
        else:
            put(cnames[cat])
        if tpl == 2:
            put(" by ")
            put(brand, 0)
            if post:
                put(" (")
                for k, a in enumerate(post):
                    if k:
                        put(", ")
                    put(values[vrow[a]], a)
                put(")")
        else:
            sep = (", ", " - ", None, " | ", " ")[tpl]
            for a in post:
                put(sep)
                put(values[vrow[a]], a)
        title = "".join(parts)
        cs = casing_l[i]
        if cs == 0:
            title = _title_case(title)
        elif cs == 2:
            title = title.upper()
        elif cs == 3:
            title = title.lower()
        p_title.append(title)
        if type_span is None:
            gt_start.append(None)
            gt_end.append(None)
        else:
            gt_start.append(type_span[0])
            gt_end.append(type_span[1])

        # ---- description
        parts = []
        cur = 0
        dattrs = [a for a in present if drow[a]]
        py.shuffle(dattrs)
        if no_desc_l[i]:
            pass
        elif rnd() < 0.85 or not dattrs:
            opener = _pick(rnd, _OPEN_BRAND) if drow[0] else _pick(rnd, _OPEN_PLAIN)
            for is_slot, s in opener:
                if not is_slot:
                    parts.append(s)
                    cur += len(s)
                else:
                    x = brand if s == "brand" else tname
                    if parts and parts[-1][-2:] == "a " and x[:1] in "aeiou" and (
                            len(parts[-1]) == 2 or parts[-1][-3] == " "):
                        parts[-1] = parts[-1][:-1] + "n "
                        cur += 1
                    if s == "brand":
                        spans.append((0, brand, "description", cur, cur + len(x)))
                    parts.append(x)
                    cur += len(x)
        n_fill = 0 if no_desc_l[i] else int(rnd() * 3)
        fill_at = {int(rnd() * (len(dattrs) + 1)) for _ in range(n_fill)}
        for k in range(len(dattrs) + 1):
            if k in fill_at:
                if cur:
                    parts.append(" ")
                    cur += 1
                s = _pick(rnd, FILLERS)
                parts.append(s)
                cur += len(s)
            if k == len(dattrs):
                break
            a = dattrs[k]
            if cur:
                parts.append(" ")
                cur += 1
            v = values[vrow[a]]
            for j, (is_slot, s) in enumerate(_pick(rnd, W.desc_tpl[a])):
                if is_slot:
                    if j == 0:
                        v2 = v[:1].upper() + v[1:]
                    else:
                        v2 = v
                    spans.append((a, v, "description", cur, cur + len(v2)))
                    parts.append(v2)
                    cur += len(v2)
                else:
                    parts.append(s)
                    cur += len(s)
        p_desc.append("".join(parts) if parts else None)

        # ---- structured attributes (+ one wrong value, + synonym variants)
        sattrs = [a for a in present if srow[a]]
        wrong_a = -1
        if wrong_l[i] and sattrs:
            wrong_a = _pick(rnd, sattrs)
            same, other = W.wrong_pools(ti, wrong_a)
            pool = same if (same and (rnd() < 0.5 or not other)) else other
            if pool:
                wv = values[_pick(rnd, pool)]
                wv_owner.append(i)
                wv_attr.append(names[wrong_a])
                wv_val.append(wv)
                wv_corr.append(values[vrow[wrong_a]])
            else:
                wrong_a = -1
        vl = variant_l[i]
        for a in sattrs:
            v = values[vrow[a]]
            if a == wrong_a:
                v = wv
            elif vl[a]:
                spell, case = variants[vrow[a]]
                cand = spell if (spell and (rnd() < 0.75 or not case)) else case
                if cand:
                    var = _pick(rnd, cand)
                    used_val.add((names[a], var, v))
                    v = var
            at_name.append(names[a])
            at_val.append(v)
        at_off.append(len(at_name))

        # ---- bullets
        bl = [f"{names[a]}: {values[vrow[a]]}" for a in present
              if (srow[a] or trow[a] or drow[a]) and rnd() < 0.4]
        for f in py.sample(BULLET_FILLERS, 1 + int(rnd() * 3)):
            bl.insert(int(rnd() * (len(bl) + 1)), f)
        p_bullets.append(bl[:5])

        # ---- product type label and brand
        m = ptm_l[i]
        if m == 0:
            p_type.append(None)
        elif m == 1:
            syn = type_syn[ti]
            if syn is not None and rnd() < P_TYPE_SYNONYM:
                used_type.add((syn, tname))
                p_type.append(syn)
            else:
                p_type.append(tname)
        else:
            sib = W.siblings[cat]
            if len(sib) > 1 and rnd() < 0.5:
                o = int(sib[int(rnd() * len(sib))])
            else:
                o = int(W.visible[int(rnd() * len(W.visible))])
            if o == ti or W.withheld[o]:
                o = int(W.visible[int(rnd() * len(W.visible))])
            p_type.append(tnames[o] if o != ti else None)
        p_brand.append(brand if brand_col_l[i] else None)

        # ---- gold spans: every placement, plus the located-nowhere structured values
        placed = set()
        for a, v, f, s0, s1 in spans:
            sp_owner.append(i)
            sp_attr.append(names[a])
            sp_val.append(v)
            sp_field.append(f)
            sp_start.append(s0)
            sp_end.append(s1)
            placed.add(a)
        for a in sattrs:
            if a not in placed:
                sp_owner.append(i)
                sp_attr.append(names[a])
                sp_val.append(values[vrow[a]])
                sp_field.append(None)
                sp_start.append(-1)
                sp_end.append(-1)

        # ---- reviews and Q&A
        if texts_l[i]:
            for _ in range(1 if rnd() < 0.6 else 2):
                a = _pick(rnd, present) if present else 0
                v = values[vrow[a]]
                if rnd() < 0.6:
                    if rnd() < 0.5:
                        body = _pick(rnd, REVIEW_VALUE).format(v=v, a=a_lower[a])
                    else:
                        body = _pick(rnd, REVIEW_PLAIN).format(type=tname)
                    tx_owner.append(i)
                    tx_kind.append("review")
                    tx_text.append(f"{_pick(rnd, REVIEW_OPEN)} {body}")
                else:
                    k = int(W.nvals[ti, a])
                    alt = values[int(W.vals[ti, a, int(rnd() * k)])] if k else v
                    if rnd() < 0.5:
                        q = f"Does this come in {alt}?"
                        ans = f"Yes, this one is {v}." if alt == v else f"No, it is {v}."
                    else:
                        q = f"What is the {a_lower[a]} of this {tname}?"
                        ans = f"It is {v}."
                    tx_owner += [i, i]
                    tx_kind += ["question", "answer"]
                    tx_text += [q, ans]

        # ---- search queries (strings only; counts are drawn below)
        if beh_l[i]:
            qs: list[str] = []
            for _ in range(nq_l[i]):
                r = rnd()
                if r < 0.40:
                    q = tname
                elif r < 0.55:
                    q = cnames[cat]
                elif r < 0.68:
                    q = f"{brand} {tname}"
                elif r < 0.80 and present:
                    q = f"{values[vrow[_pick(rnd, present)]]} {tname}"
                elif r < 0.90:
                    sib = W.siblings[cat]
                    q = tnames[int(sib[int(rnd() * len(sib))])]
                elif r < 0.95 and type_syn[ti] is not None:
                    q = type_syn[ti]
                    used_type.add((q, tname))
                elif present:
                    q = f"{values[vrow[_pick(rnd, present)]]} {cnames[cat]}"
                else:
                    q = tname
                q = q.lower()
                if q not in qs:
                    qs.append(q)
            q_owner += [i] * len(qs)
            q_text += qs

    out: dict = {}
    ids_arr = pa.array(ids, pa.string())
    attrs_arr = pa.ListArray.from_arrays(
        pa.array(at_off, pa.int32()),
        pa.StructArray.from_arrays(
            [pa.array(at_name, pa.string()), pa.array(at_val, pa.string())],
            fields=list(ATTRIBUTE_PAIR),
        ),
    )
    products = pa.Table.from_arrays(
        [ids_arr, pa.array(p_title, pa.string()), pa.array(p_desc, pa.string()),
         pa.array(p_bullets, pa.list_(pa.string())), pa.array(p_type, pa.string()),
         attrs_arr, pa.array(p_brand, pa.string())],
        schema=PRODUCTS,
    )
    own_all = np.arange(n, dtype=np.int64)
    out["products"] = (products, own_all)
    out["gold/types"] = (pa.Table.from_arrays(
        [ids_arr, pa.array([tnames[x] for x in t_l], pa.string()),
         pa.array(gt_start, pa.int32()), pa.array(gt_end, pa.int32())], schema=GOLD_TYPES), own_all)

    def owned(owner: list[int], cols: list, schema: pa.Schema):
        o = np.asarray(owner, dtype=np.int64)
        arrs = [ids_arr.take(pa.array(o))] + [pa.array(c, f.type) for c, f in zip(cols, list(schema)[1:])]
        return pa.Table.from_arrays(arrs, schema=schema), o

    out["gold/spans"] = owned(sp_owner, [sp_attr, sp_val, sp_field, sp_start, sp_end], GOLD_SPANS)
    out["gold/wrong_values"] = owned(wv_owner, [wv_attr, wv_val, wv_corr], GOLD_WRONG_VALUES)
    out["texts"] = owned(tx_owner, [tx_kind, tx_text], TEXTS)

    # ---- behaviour: views, clicks, purchases per (query, product)
    qo = np.asarray(q_owner, dtype=np.int64)
    m = len(qo)
    scale = np.sqrt(pop[qo]) if m else np.zeros(0)
    views = 1 + rng_q.poisson(2.0 * scale)
    clicks = rng_c.binomial(views, 0.35)
    buys = rng_b.binomial(clicks, 0.15)
    qi = np.concatenate([np.arange(m)] * 3)
    act = np.repeat(np.arange(3), m)
    cnt = np.concatenate([views, clicks, buys]).astype(np.int64)
    keep = cnt > 0
    qi, act, cnt = qi[keep], act[keep], cnt[keep]
    order = np.lexsort((act, qi))
    qi, act, cnt = qi[order], act[order], cnt[order]
    beh = pa.Table.from_arrays(
        [pa.array(q_text, pa.string()).take(pa.array(qi)), ids_arr.take(pa.array(qo[qi])),
         pa.array(np.array(["view", "click", "purchase"], dtype=object)[act], pa.string()),
         pa.array(cnt, pa.int64())], schema=BEHAVIOR)
    out["behavior"] = (beh, qo[qi])

    # ---- co-purchases: src -> a product of a complementary type (or of the same type)
    pool = rng_co.integers(0, max(n_total, 1), COPURCHASE_POOL)
    pool_t = W.type_of(pool)
    order = np.argsort(pool_t, kind="stable")
    pool, pool_t = pool[order], pool_t[order]
    p_start = np.searchsorted(pool_t, np.arange(W.n_types), side="left")
    p_cnt = np.searchsorted(pool_t, np.arange(W.n_types), side="right") - p_start
    src = np.repeat(np.arange(n, dtype=np.int64), n_out)
    st = t[src]
    k = len(src)
    comp_n = W.comp_n[st]
    u = rng_co.random((k, 4))
    use_comp = (u[:, 0] < 0.7) & (comp_n > 0)
    r = (u[:, 1] * np.maximum(comp_n, 1)).astype(np.int64)
    dt = np.where(use_comp, W.comp[st, r], st)
    c = p_cnt[dt]
    ok = c > 0
    c1 = p_start[dt] + (u[:, 2] * np.maximum(c, 1)).astype(np.int64)
    c2 = p_start[dt] + (u[:, 3] * np.maximum(c, 1)).astype(np.int64)
    c1, c2 = np.minimum(c1, len(pool) - 1), np.minimum(c2, len(pool) - 1)
    d1, d2 = pool[c1], pool[c2]
    dst = np.where(W.popularity_of(d2) > W.popularity_of(d1), d2, d1)  # popular partners win
    gsrc = src + start
    ok &= dst != gsrc
    src, dst, gsrc = src[ok], dst[ok], gsrc[ok]
    pair_cnt = 1 + rng_n.poisson(0.3 * np.sqrt(pop[src] * W.popularity_of(dst)))
    key = src * np.int64(max(n_total, 1)) + dst
    ukey, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=pair_cnt, minlength=len(ukey)).astype(np.int64)
    usrc = ukey // np.int64(max(n_total, 1))
    udst = ukey % np.int64(max(n_total, 1))
    hold = rng_h.random(len(ukey)) < P_COPURCHASE_HOLDOUT
    for name, mask in (("copurchase", ~hold), ("gold/copurchase", hold)):
        s_, d_, c_ = usrc[mask], udst[mask], sums[mask]
        tab = pa.Table.from_arrays(
            [ids_arr.take(pa.array(s_)), pa.array([_pid(x) for x in d_.tolist()], pa.string()),
             pa.array(c_, pa.int64())], schema=COPURCHASE if name == "copurchase" else GOLD_COPURCHASE)
        out[name] = (tab, s_)
    out["_used"] = (used_val, used_type)
    return out


# ---- writing ---------------------------------------------------------------------------------
SHARDED = {
    "products": PRODUCTS,
    "texts": TEXTS,
    "behavior": BEHAVIOR,
    "copurchase": COPURCHASE,
    "gold/types": GOLD_TYPES,
    "gold/spans": GOLD_SPANS,
    "gold/wrong_values": GOLD_WRONG_VALUES,
    "gold/copurchase": GOLD_COPURCHASE,
}


class _ShardedTable:
    """part-00000.parquet, part-00001.parquet … in one folder; row groups of ROW_GROUP rows."""

    def __init__(self, folder: Path, schema: pa.Schema):
        self.folder, self.schema = folder, schema
        if folder.exists():
            shutil.rmtree(folder)  # stale shards of an earlier, larger run would be read too
        folder.mkdir(parents=True)
        self.writer: pq.ParquetWriter | None = None
        self.buf: list[pa.Table] = []
        self.nbuf = 0
        self.rows = 0
        self.files = 0

    def open(self, shard: int) -> None:
        self.close()
        path = self.folder / f"part-{shard:05d}.parquet"
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.files += 1

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buf.append(conform(table, self.schema))
            self.nbuf += table.num_rows
            if self.nbuf >= ROW_GROUP:
                self.flush()

    def flush(self) -> None:
        if self.buf and self.writer is not None:
            t = pa.concat_tables(self.buf)
            self.writer.write_table(t, row_group_size=ROW_GROUP)
            self.rows += t.num_rows
        self.buf, self.nbuf = [], 0

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
            self.writer = None


def _write_single(path: Path, table: pa.Table, schema: pa.Schema) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(table, schema), path, compression="zstd")
    return table.num_rows


def synthesize(
    n_products: int,
    out: str | Path,
    *,
    seed: int = 0,
    shard_rows: int = 100_000,
    progress: bool = False,
    n_types: int | None = None,
) -> dict:
    """Write a synthetic catalogue with gold labels to `out`; return summary counts.

    `n_types` overrides the number of leaf types (default: `n_types_for(n_products)`).
    """
    if n_products < 0:
        raise ValueError("n_products must be >= 0")
    if shard_rows < 1:
        raise ValueError("shard_rows must be >= 1")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = World(seed, n_types if n_types is not None else n_types_for(n_products))

    writers = {name: _ShardedTable(out / name, schema) for name, schema in SHARDED.items()}
    n_shards = max(1, math.ceil(n_products / shard_rows))
    used_val: set = set()
    used_type: set = set()
    shard = 0
    for w in writers.values():
        w.open(0)
    bar = progress_bar(n_products, "synth", "products", on=progress)
    block = 0
    start = 0
    while start < n_products:
        n = min(GEN_BLOCK, n_products - start)
        res = generate_block(world, block, n_products, n)
        uv, ut = res.pop("_used")
        used_val |= uv
        used_type |= ut
        # cut the block at shard boundaries
        lo = 0
        while lo < n:
            g = start + lo
            s = g // shard_rows
            if s != shard:
                shard = s
                for w in writers.values():
                    w.open(shard)
            hi = min(n, (s + 1) * shard_rows - start)
            for name, (tab, owner) in res.items():
                a = int(np.searchsorted(owner, lo, side="left"))
                b = int(np.searchsorted(owner, hi, side="left"))
                if b > a:
                    writers[name].add(tab.slice(a, b - a))
            lo = hi
        bar.update(n)
        start += n
        block += 1
    for w in writers.values():
        w.close()
    bar.close()

    counts = {name: w.rows for name, w in writers.items()}
    tax = world.taxonomy_rows()
    counts["taxonomy"] = _write_single(
        out / "taxonomy.parquet",
        pa.table({"type": [r[0] for r in tax], "parent": [r[1] for r in tax]}), TAXONOMY)
    hyp = world.hypernym_rows()
    counts["gold/hypernyms"] = _write_single(
        out / "gold" / "hypernyms.parquet",
        pa.table({"child": [r[0] for r in hyp], "child_kind": [r[1] for r in hyp],
                  "parent": [r[2] for r in hyp], "depth": pa.array([r[3] for r in hyp], pa.int32())}),
        GOLD_HYPERNYMS)
    syn = sorted(("type", None, term, canon) for term, canon in used_type)
    syn += sorted(("value", a, term, canon) for a, term, canon in used_val)
    counts["gold/synonyms"] = _write_single(
        out / "gold" / "synonyms.parquet",
        pa.table({"kind": [r[0] for r in syn], "attribute": pa.array([r[1] for r in syn], pa.string()),
                  "term": [r[2] for r in syn], "canonical": [r[3] for r in syn]}),
        GOLD_SYNONYMS)
    manifest = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "n_products": n_products,
        "shard_rows": shard_rows,
        "shards": n_shards,
        "taxonomy": {
            "departments": len(set(world.cat_dept) | set(world.themes.values())),
            "categories": len(world.cat_names) + len(world.themes),
            "types": world.n_types,
            "withheld_types": int(world.withheld.sum()),
            "types_with_two_parents": int(sum(len(p) > 1 for p in world.parents)),
            "attributes": len(world.attrs),
            "values": len(world.values),
        },
        "counts": dict(sorted(counts.items())),
    }
    (out / "gold" / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {**manifest, "out": str(out), "seconds": round(time.perf_counter() - t0, 2)}
