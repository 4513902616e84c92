"""Run configuration: the schema (`schema.py`, frozen dataclasses) apart from the loader (`loader.py`)."""

from npo_engine.config.loader import (
    config_to_dict,
    describe_fields,
    dump_config,
    field_docs,
    load_config,
    parse_override,
)
from npo_engine.config.schema import *  # noqa: F403  (every section dataclass, TrainConfig, ConfigError)
from npo_engine.config.schema import __all__ as _schema_names

__all__ = ["config_to_dict", "describe_fields", "dump_config", "field_docs", "load_config", "parse_override",
           *_schema_names]
