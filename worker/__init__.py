"""The hospital worker: split Llama with LoRA, DP training, encrypted updates."""
