"""Datasets: the built-in digits, image folders (ADM centre crop), and latent caches."""
