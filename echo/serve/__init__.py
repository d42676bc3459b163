"""Using a model: bundles, the scoring path, loading, the MLflow pyfunc and the registry."""
