"""Training data: files -> validated rows (the one place that reports file / row / field errors)
-> tokenized samples -> mixing by probability.

    rows, report = load_rows(["prefs.jsonl", "more.parquet"], partial(validate_preference, keys=keys))

errors.py   DataError (path:row: field 'x': reason), SkipReport
readers.py  read_records (jsonl / json / parquet / save_to_disk folder), load_rows, split_paths
schema.py   validate_preference (+ PreferenceKeys), validate_conversation, validate_prompt
mixing.py   mix_datasets (``--dataset_probs`` are mixing weights), split_eval
"""

from rlhf_data.errors import DataError, SkipReport
from rlhf_data.mixing import mix_datasets, mixing_weights, split_eval
from rlhf_data.readers import load_rows, read_records, split_paths
from rlhf_data.schema import PreferenceKeys, validate_conversation, validate_preference, validate_prompt

__all__ = [
    "DataError",
    "SkipReport",
    "PreferenceKeys",
    "load_rows",
    "mix_datasets",
    "mixing_weights",
    "read_records",
    "split_eval",
    "split_paths",
    "validate_conversation",
    "validate_preference",
    "validate_prompt",
]
