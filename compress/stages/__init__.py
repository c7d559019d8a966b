"""Compression stages, one module each, registered by name (adding a stage is adding a file here and naming
it in recipe.py's BUILTIN import). The interfaces are in base.py, the recipe in recipe.py, the contract in
docs/stages.md."""
