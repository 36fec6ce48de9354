"""The personalization methods, one module or folder each (peft style: config, layer math,
model wrapper). Shared LoRA piece math lives in :mod:`shared.methods.lora_pieces`."""
