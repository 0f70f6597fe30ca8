"""Prompt data: loading, templates, tokenisation, resumable sampling, the embedded task."""
from .dataset import Example, FilterStats, PromptDataset, build_dataset, tokenize_records
from .embedded import (EMBEDDED_TASK, embedded_eval_splits, embedded_validation_split,
                       generate_embedded, held_out_prompts,
                       write_embedded_dataset)
from .loading import ACCEPTED, DataError, load_records
from .sampler import PromptSampler
from .templates import THINK_SYSTEM_PROMPT, TemplateError, render_prompt

__all__ = ["ACCEPTED", "EMBEDDED_TASK", "DataError", "Example", "FilterStats", "PromptDataset",
           "PromptSampler",
           "THINK_SYSTEM_PROMPT", "TemplateError", "build_dataset", "embedded_eval_splits",
           "embedded_validation_split",
           "generate_embedded", "held_out_prompts",
           "load_records", "render_prompt", "tokenize_records", "write_embedded_dataset"]
