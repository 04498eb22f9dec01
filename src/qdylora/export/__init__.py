"""Shipping one rank: the PEFT LoRA export and the merge into the base."""

# The files of a PEFT adapter folder (PEFT's CONFIG_NAME and SAFETENSORS_WEIGHTS_NAME; a test checks
# them against PEFT): here, not in export/peft.py, so the run directory's --overwrite rule can name
# them without importing the exporters (which read runs).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
