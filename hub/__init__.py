"""The Hugging Face Hub side of bundles: publishing one (push, model card) and resolving hf:// references."""
