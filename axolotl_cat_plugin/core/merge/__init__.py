"""Static merges of skill LoRAs through PEFT (`axolotl-cat merge`), the baselines for CAT:
`methods.py` the methods' registry and their checks, `run.py` runs one through PEFT's
add_weighted_adapter, `record.py` writes merge_record.json beside the adapter."""
