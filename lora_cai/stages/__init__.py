"""A round's stages, one module each, each a function from the artifacts it reads to those it writes."""
