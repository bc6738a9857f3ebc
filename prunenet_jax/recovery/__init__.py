"""Recovery fine-tuning of a pruned model: LoRA or full, distilling its dense source or on text."""
