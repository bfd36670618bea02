"""Model loading, bundled models, tiny test models, and architecture mappings."""
