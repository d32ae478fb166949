"""The settings of the bookshop test project."""
