"""Kernel redirection: pure rule renderers and the thin layers that apply them."""
