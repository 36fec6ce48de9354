"""Code both sides use: models, data, prompts, retrieval, metrics and the methods' math."""
