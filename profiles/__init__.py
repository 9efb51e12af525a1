"""Deployment profiles (TOML) shipped as package data; read them with importlib.resources."""
