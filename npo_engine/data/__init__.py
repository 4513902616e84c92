"""Prompt data: the `PromptRecord` every prompt source yields, and readers for JSON-lines and Parquet
files."""

from npo_engine.data.files import DatasetError, LoadReport, load_prompt_file, load_prompt_files
from npo_engine.data.records import PromptRecord

__all__ = ["DatasetError", "LoadReport", "PromptRecord", "load_prompt_file", "load_prompt_files"]
