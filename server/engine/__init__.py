"""The engine: the model manager, loaded models (classifier, translator, tensor model), the dynamic batcher, the
translation scheduler and its KV cache, metrics and model configs. Imports the backends, never the edge."""
