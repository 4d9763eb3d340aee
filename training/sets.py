"""From the ``[[data.sets]]`` of a config to train and validation items."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import Config, ConfigError, SetSection
from .data import Item, TrainingData, load_pairs, load_slide_item, threshold_mapping, value_mapping


def class_values(cfg: Config) -> dict[str, int]:
    """Class name -> label value (1-based, in the order of model.classes)."""
    return {name: i + 1 for i, name in enumerate(cfg.model.classes)}


def pair_mapping(s: SetSection, values: dict[str, int]):
    if s.mapping == "ebhi":  # EBHI-Seg gland masks -> tissue classes (training/ebhi.py)
        from .ebhi import mapping_for_set
        return mapping_for_set(s, values)
    if s.mapping == "values":
        if not s.values:
            raise ConfigError("data.sets: mapping = \"values\" needs values = {\"<mask value>\" = "
                              "\"<class>\", ...}")
        return value_mapping({int(k): values[v] for k, v in s.values.items() if v})
    if s.mapping == "threshold":
        background = values[s.background] if s.background else 0
        if s.foreground_column:
            def pick(row: dict[str, str]) -> int:
                key = row.get(s.foreground_column)
                if key not in s.foreground_map:
                    raise ConfigError(f"data.sets: {s.foreground_column} = {key!r} is not in "
                                      f"foreground_map {sorted(s.foreground_map)}; add it")
                return values[s.foreground_map[key]]
            return threshold_mapping(s.threshold, pick, background)
        if not s.foreground:
            raise ConfigError("data.sets: mapping = \"threshold\" needs foreground = \"<class>\" "
                              "or foreground_column + foreground_map")
        return threshold_mapping(s.threshold, values[s.foreground], background)
    raise ConfigError(f"data.sets: mapping must be values, threshold or ebhi, got {s.mapping!r}")


def load_set(s: SetSection, cfg: Config, split: str) -> list[Item]:
    items = _load_set(s, cfg, split)
    if s.weight != 1.0 or s.teacher:
        items = [dataclasses.replace(it, weight=s.weight, teacher=s.teacher) for it in items]
    return items


def _load_set(s: SetSection, cfg: Config, split: str) -> list[Item]:
    values = class_values(cfg)
    if s.kind == "pairs":
        if not s.index:
            raise ConfigError("data.sets: a pairs set needs index = \"<CSV of image,label paths>\"")
        scale = (s.image_mpp / cfg.data.mpp) if s.image_mpp else 1.0
        if not s.split_column and split == "val":
            return []
        return load_pairs(s.index, pair_mapping(s, values), split=split if s.split_column else None,
                          split_column=s.split_column, image_column=s.image_column,
                          mask_column=s.mask_column, limit=s.limit, scale=scale,
                          annotation=s.annotation)
    items = []
    for item in s.items:
        if item.get("split", "train") != split:
            continue
        class_map: dict[str, Any] = {k: (values[v] if v else None)
                                     for k, v in s.class_map.items()}
        for name in values:  # classes named as in the config need no entry
            class_map.setdefault(name, values[name])
        raster_values = {int(k): values[v] for k, v in s.values.items() if v} or None
        items.append(load_slide_item(item, model_mpp=cfg.data.mpp, annotation=s.annotation,
                                     values=raster_values, class_map=class_map))
    return items


def build_data(cfg: Config) -> TrainingData:
    """Load every set's train and val items (slides stay open until the data is closed)."""
    train: list[Item] = []
    val: list[Item] = []
    try:
        for s in cfg.data.sets:
            train += load_set(s, cfg, "train")
            val += load_set(s, cfg, "val")
    except BaseException:
        TrainingData(train, val, [it.slide for it in train + val if it.slide is not None]).close()
        raise
    return TrainingData(train, val, [it.slide for it in train + val if it.slide is not None])
