"""Heavy backends at their published sizes with random weights, for bench/backends.py.

Compute does not depend on the weights' values: a model built from the real checkpoint's config,
with random weights and generation held to a fixed number of tokens, costs what the real one costs.
One module per backend, run inside that backend's image (the repository mounted at its own path),
each with:

- `SOURCE`: where its sizes come from (the checkpoint's hub id and file), written next to them;
- `build(models_dir) -> dict`: builds the model into `models_dir` once (skipped when already
  there) and returns its model config, as a configs/*.yaml would hold it;
- `fix_length(backend, tokens)`: makes the loaded production backend generate exactly `tokens`
  tokens (random weights would otherwise stop at once, or never);
- `REQUEST` (optional): the request's fields besides `model` and `text` (a voice, a language).

bench/real_size/run.py loads each through the production backend code and measures it.
"""
