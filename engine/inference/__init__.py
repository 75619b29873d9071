"""Using a trained model: KV-cache generation, perplexity evaluation, loading for tools."""
