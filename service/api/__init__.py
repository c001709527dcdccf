"""Sample protected resources."""
