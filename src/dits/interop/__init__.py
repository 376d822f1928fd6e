"""Interoperability with other libraries (diffusers).

Imported lazily: ``import dits`` never pulls in diffusers.
"""
