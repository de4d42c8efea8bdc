"""Model and data registries (name -> factory) and the shipped demo models."""
