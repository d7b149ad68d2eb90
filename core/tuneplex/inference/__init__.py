"""Using a trained model: loading, prompt rendering as training did, batched generation, metrics."""
